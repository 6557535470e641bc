"""The Flower ServerApp: a thin handler over ``lowres.federated.server.run_federation``.

Deployment (``flwr run``) loads ``app`` by import string and passes the federation YAML as run config:

    flwr run <app dir> <federation> --run-config 'fed-config="/abs/path/configs/fed/tiny-deploy.yaml"'

(``fed-overrides`` may add ``"rounds=3 compression.up=int8"``.) The simulation builds its ServerApp in
process with ``make_server_app(fed)`` so the result comes back to the caller.
"""

from __future__ import annotations

from flwr.app import Context
from flwr.serverapp import Grid, ServerApp

app = ServerApp()


@app.main()
def main(grid: Grid, context: Context) -> None:
    """Run the federation named by the run config's ``fed-config``."""
    from rich.console import Console

    from lowres.federated.config import load_fed_config
    from lowres.federated.server import run_federation

    path = str(context.run_config.get("fed-config", ""))
    overrides = str(context.run_config.get("fed-overrides", "")).split()
    run_federation(grid, load_fed_config(path or None, overrides), console=Console(stderr=True))


def make_server_app(fed, holder: dict, console=None, prep=None) -> ServerApp:
    """A ServerApp running ``fed`` whose FedResult (or exception) lands in ``holder``."""
    from lowres.federated.server import run_federation

    server = ServerApp()

    @server.main()
    def _main(grid: Grid, context: Context) -> None:
        try:
            holder["result"] = run_federation(grid, fed, console=console, prep=prep)
        except BaseException as exc:  # handed to the caller, who re-raises it: the simulation swallows it
            holder["error"] = exc

    return server
