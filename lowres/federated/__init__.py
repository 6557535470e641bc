"""Federated LoRA/QLoRA fine-tuning on Flower (``lowres fed``).

Plain functions, then thin Flower handlers over them:

    compression.py   codecs (none, fp16, int8, top-k, pruning, error feedback) — pure numpy
    wire.py          codec arrays ↔ Flower ArrayRecords; exact serialised bytes of a message's content
    strategy.py      validation of updates, FedAvg over rank slots (heterogeneous ranks), metric sums
    partition.py     IID and Dirichlet non-IID splits of one dataset for simulated clients
    global_state.py  the global adapter per round in safetensors; resume
    config.py        FedConfig (configs/fed/*.yaml)
    client.py        a client's round: load global → train (the lowres recipe) → encode update; model cache
    server.py        the server's rounds over a Flower Grid: bounded waits, screening, checkpoints, eval
    monitor.py       MLflow (parent + child runs) and Prometheus (lowres_fed_*), offline detection
    watch.py         any Flower app's strategy wrapped so its rounds are reported through monitor.py
    client_app.py, server_app.py   the Flower ClientApp / ServerApp handlers
    simulation.py    the simulation engine (Flower + Ray, in process)
    deploy.py        the deployment engine (SuperLink, SuperNodes, flwr run, TLS certificates)
    local_grid.py    an in-process Grid for tests and the compression benchmark
"""
