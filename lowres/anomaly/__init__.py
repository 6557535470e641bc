"""Federated log anomaly detection with small LMs (``lowres anomaly``): teachers on clients, a student on the server.

    preprocess.py   masking (numbers, block ids, IPs, paths, URLs → <*>), sessions by block id, template rendering
    teachers.py     per-client LoRA next-token teachers: one-shot, or FedAvg rounds through lowres.federated
    scoring.py      per-session accuracy/loss, exact upload bytes, mean/max aggregation, top/bottom-k, F1
    student.py      a small Llama classifier (LoRA + head) trained on pseudo-labels; save / load
    pipeline.py     the method beside the teachers-only FedAvg baseline, figures to MLflow
    detect.py       a saved student on a `Sequence,label` CSV or raw log lines
    data/           the HDFS files the pipeline and tests use (PROVENANCE.md)
"""
