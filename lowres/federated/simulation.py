"""The simulation engine: N virtual clients on one machine, through Flower's Ray-backed simulation runtime.

    result = simulate(load_fed_config("configs/fed/tiny-sim.yaml"))

Why ``flwr.simulation.run_simulation`` (marked legacy in flwr 1.41) rather than ``flwr run`` against a local
simulation federation: ``flwr run`` packages the app as a FAB and runs the ServerApp in another process behind
a SuperLink, so the result, the MLflow run ids and any error come back only through logs; startup costs a
SuperLink and a SuperExec on top of Ray. ``run_simulation`` runs the ServerApp in this process (our round
loop, MLflow and the Prometheus exporter live here, so they are live while it runs) and the ClientApps in Ray
actors — the same ServerApp/ClientApp code the deployment engine runs. On a 2-core machine: ``actors``
actors of ``cpus_per_client`` CPUs each (Ray schedules clients onto them in turn) and one torch thread per
client (``train.threads`` in the federation's ``run:``), so 10 clients of ``tiny`` run without
oversubscribing the cores. Each actor caches the clients it has loaded (client.py), so a client's base
model loads once per actor, not once per round.
"""

from __future__ import annotations

import os
from typing import Any

from lowres.federated.config import FedConfig


def simulate(fed: FedConfig, *, actors: int | None = None, console: Any = None, verbose: bool = False):
    """Run ``fed`` with ``fed.clients`` virtual SuperNodes; return the FedResult (re-raise the server's error)."""
    os.environ.setdefault("FLWR_TELEMETRY_ENABLED", "0")
    os.environ.setdefault("FLWR_DISABLE_UPDATE_CHECK", "1")
    os.environ.setdefault("RAY_DEDUP_LOGS", "0")
    from flwr.simulation import run_simulation

    from lowres.federated.client_app import app as client_app
    from lowres.federated.server import prepare
    from lowres.federated.server_app import make_server_app
    from lowres.hardware import usable_cpus

    # Prepare before Ray starts: partitions and the shared tokenizer must exist when the first client loads.
    prep = prepare(fed)
    cpus = usable_cpus()
    actors = max(1, min(actors or cpus, fed.clients))
    holder: dict = {}
    backend = {"client_resources": {"num_cpus": cpus / actors, "num_gpus": 0.0},
               "init_args": {"num_cpus": cpus, "include_dashboard": False, "log_to_driver": verbose,
                             "configure_logging": True, "logging_level": "warning" if not verbose else "info"}}
    run_simulation(server_app=make_server_app(fed, holder, console, prep), client_app=client_app,
                   num_supernodes=fed.clients, backend_config=backend, verbose_logging=verbose)
    _shutdown_ray()
    if "error" in holder:
        raise holder["error"]
    if "result" not in holder:
        from lowres.federated.server import FederationError

        raise FederationError("the simulation ended without a result (see Flower's log above)")
    return holder["result"]


def _shutdown_ray() -> None:
    """Flower leaves Ray running after the simulation; a second simulation in this process needs it gone."""
    try:
        import ray

        if ray.is_initialized():
            ray.shutdown()
    except Exception:  # Ray already down or never imported: nothing to free
        pass
