"""One table of every metric the profiler produces: name, unit, kind, help, and its MLflow name.

Prometheus names follow ``lowres_<subsystem>_<name>_<unit>`` in base units. MLflow names reuse MLflow's own
system-metric names where they mean the same thing (so its UI's system-metrics view shows them); those are
converted to MLflow's units (percent, megabytes) by ``mlflow_scale``.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

Kind = Literal["gauge", "counter"]

MB = 1 / 1e6


@dataclass(frozen=True)
class Metric:
    name: str  # Prometheus name, base units
    kind: Kind
    unit: str
    help: str
    mlflow_name: str | None = None  # None: not sent to MLflow's system metrics
    mlflow_scale: float = 1.0  # multiply the base-unit value by this for MLflow
    labels: tuple[str, ...] = ()


_M = Metric
CATALOG: dict[str, Metric] = {
    m.name: m
    for m in [
        # process tree (the watched process and all its descendants)
        _M("lowres_process_cpu_seconds_total", "counter", "seconds",
           "CPU time (user+system) of the watched process tree, exited children included"),
        _M("lowres_process_cpu_utilization_ratio", "gauge", "ratio",
           "CPU use of the process tree in cores (1.0 = one core busy)", "system/lowres/process_cpu_cores"),
        _M("lowres_process_resident_memory_bytes", "gauge", "bytes",
           "resident memory (RSS) of the process tree", "system/lowres/process_rss_megabytes", MB),
        _M("lowres_process_resident_memory_peak_bytes", "gauge", "bytes",
           "peak RSS of the process tree: the sum over processes of the kernel's high-water mark (VmHWM)",
           "system/lowres/process_rss_peak_megabytes", MB),
        _M("lowres_process_count", "gauge", "processes", "processes in the watched tree"),
        _M("lowres_process_io_read_bytes_total", "counter", "bytes", "bytes read from storage by the tree"),
        _M("lowres_process_io_write_bytes_total", "counter", "bytes", "bytes written to storage by the tree"),
        # system
        _M("lowres_system_cpu_utilization_ratio", "gauge", "ratio",
           "system-wide CPU use, 0..1", "system/cpu_utilization_percentage", 100.0),
        _M("lowres_system_cpu_core_utilization_ratio", "gauge", "ratio",
           "per-core CPU use, 0..1", None, 1.0, ("cpu",)),
        _M("lowres_system_memory_used_bytes", "gauge", "bytes",
           "system memory in use (total - available)", "system/system_memory_usage_megabytes", MB),
        _M("lowres_system_memory_used_ratio", "gauge", "ratio",
           "system memory in use as a fraction of total", "system/system_memory_usage_percentage", 100.0),
        _M("lowres_system_swap_used_bytes", "gauge", "bytes", "swap in use", "system/lowres/swap_used_megabytes", MB),
        _M("lowres_system_disk_read_bytes_total", "counter", "bytes", "bytes read from all disks"),
        _M("lowres_system_disk_write_bytes_total", "counter", "bytes", "bytes written to all disks"),
        _M("lowres_system_network_receive_bytes_total", "counter", "bytes", "bytes received on all interfaces",
           "system/network_receive_megabytes", MB),
        _M("lowres_system_network_transmit_bytes_total", "counter", "bytes", "bytes sent on all interfaces",
           "system/network_transmit_megabytes", MB),
        # GPU through NVML (label gpu = index)
        _M("lowres_gpu_utilization_ratio", "gauge", "ratio", "GPU busy fraction", "system/gpu_{gpu}_utilization_percentage",
           100.0, ("gpu",)),
        _M("lowres_gpu_memory_used_bytes", "gauge", "bytes", "device memory in use",
           "system/gpu_{gpu}_memory_usage_megabytes", MB, ("gpu",)),
        _M("lowres_gpu_memory_total_bytes", "gauge", "bytes", "device memory in total", None, 1.0, ("gpu",)),
        _M("lowres_gpu_process_memory_bytes", "gauge", "bytes",
           "device memory used by the watched tree (absent where NVML cannot tell, never zero)",
           "system/lowres/gpu_{gpu}_process_memory_megabytes", MB, ("gpu",)),
        _M("lowres_gpu_power_watts", "gauge", "watts", "board power draw", "system/gpu_{gpu}_power_watts", 1.0, ("gpu",)),
        _M("lowres_gpu_temperature_celsius", "gauge", "celsius", "GPU temperature", None, 1.0, ("gpu",)),
        _M("lowres_gpu_sm_clock_hertz", "gauge", "hertz", "SM clock", None, 1.0, ("gpu",)),
        # torch CUDA caching allocator (label device = cuda index)
        _M("lowres_torch_cuda_allocated_bytes", "gauge", "bytes", "bytes held by live tensors", None, 1.0, ("device",)),
        _M("lowres_torch_cuda_allocated_peak_bytes", "gauge", "bytes", "peak bytes of live tensors since last reset",
           "system/lowres/cuda_{device}_peak_allocated_megabytes", MB, ("device",)),
        _M("lowres_torch_cuda_reserved_bytes", "gauge", "bytes", "bytes reserved by the caching allocator", None, 1.0,
           ("device",)),
        # the profiler itself
        _M("lowres_profiler_cpu_seconds_total", "counter", "seconds", "CPU time spent by the sampler itself"),
        _M("lowres_profiler_samples_total", "counter", "ticks", "sampling ticks taken"),
        _M("lowres_profiler_overhead_ratio", "gauge", "ratio",
           "sampler CPU time as a fraction of the watched tree's CPU time", "system/lowres/profiler_overhead_ratio"),
        # training (written by the recipe, not sampled)
        _M("lowres_train_loss", "gauge", "nats", "training loss of the last step"),
        _M("lowres_train_tokens_per_second", "gauge", "tokens/s", "training throughput of the last step"),
        _M("lowres_train_step_seconds", "gauge", "seconds", "wall time of the last optimizer step"),
        _M("lowres_train_steps_total", "counter", "steps", "optimizer steps done"),
        _M("lowres_train_mfu_ratio", "gauge", "ratio", "model FLOP utilisation against the measured roofline"),
        _M("lowres_train_learning_rate", "gauge", "1", "learning rate of the last step"),
        # federations (written by the lowres fed server, labels federation and client; not sampled)
        _M("lowres_fed_round", "gauge", "rounds", "the round the federation is in (last started)",
           labels=("federation",)),
        _M("lowres_fed_bytes_sent_total", "counter", "bytes",
           "bytes of message content the server sent to a client (exact serialised size)",
           labels=("federation", "client")),
        _M("lowres_fed_bytes_received_total", "counter", "bytes",
           "bytes of message content the server received from a client (exact serialised size)",
           labels=("federation", "client")),
        _M("lowres_fed_round_seconds", "gauge", "seconds", "wall time of the last finished round",
           labels=("federation",)),
        _M("lowres_fed_client_train_seconds", "gauge", "seconds", "a client's local training time in its last round",
           labels=("federation", "client")),
        _M("lowres_fed_client_peak_memory_bytes", "gauge", "bytes",
           "a client's peak RSS during its last round's training (its own profiler)", labels=("federation", "client")),
        _M("lowres_fed_client_cpu_utilization_ratio", "gauge", "ratio",
           "a client's mean CPU use in cores during its last round's training", labels=("federation", "client")),
        _M("lowres_fed_strategy_metric", "gauge", "1",
           "a watched Flower strategy's own aggregated metric of the last round (lowres.federated.watch); "
           "phase train | evaluate | central, metric: the app's key", labels=("federation", "phase", "metric")),
        _M("lowres_fed_client_last_report_timestamp_seconds", "gauge", "seconds",
           "Unix time of a client's last reply", labels=("federation", "client")),
        _M("lowres_fed_client_up", "gauge", "1", "1 while a client has replied within the offline timeout, else 0",
           labels=("federation", "client")),
        _M("lowres_fed_client_failures_total", "counter", "failures",
           "rounds a client failed (error, timeout) or had its update rejected", labels=("federation", "client")),
        _M("lowres_fed_updates_rejected_total", "counter", "updates",
           "updates rejected by validation (NaN/Inf, shapes, outlying norm)", labels=("federation", "client")),
        _M("lowres_fed_clients_accepted", "gauge", "clients", "updates averaged into the last round",
           labels=("federation",)),
        _M("lowres_fed_eval_loss", "gauge", "nats", "centralised eval loss of the global adapter after the last round",
           labels=("federation",)),
        _M("lowres_fed_federated_eval_loss", "gauge", "nats",
           "sample-weighted eval loss of the global adapter on the clients' own eval data", labels=("federation",)),
        _M("lowres_fed_eval_accuracy_ratio", "gauge", "ratio",
           "centralised top-1 next-token accuracy of the global adapter after the last round", labels=("federation",)),
        _M("lowres_fed_federated_eval_accuracy_ratio", "gauge", "ratio",
           "example-weighted top-1 next-token accuracy of the latest evaluated global adapter on the clients' own "
           "eval data", labels=("federation",)),
        _M("lowres_fed_server_heartbeat_timestamp_seconds", "gauge", "seconds",
           "Unix time of the federation server's last heartbeat (set every second while it is alive)",
           labels=("federation",)),
        _M("lowres_fed_server_progress_timestamp_seconds", "gauge", "seconds",
           "Unix time of the server's last round progress (round started or done, a reply or failure recorded)",
           labels=("federation",)),
        _M("lowres_fed_server_status", "gauge", "1",
           "1 for the server's current status (running, finished, failed), 0 for the others",
           labels=("federation", "status")),
    ]
}


def get(name: str) -> Metric:
    """The catalog entry for ``name``; a KeyError names the unknown metric (our own bug, so it raises)."""
    try:
        return CATALOG[name]
    except KeyError:
        raise KeyError(f"metric {name!r} is not in profiler.metric_catalog; add it there first") from None


def mlflow_key(metric: Metric, labels: dict[str, str]) -> str | None:
    """The MLflow metric key for a metric with these labels, or None where it has none."""
    if metric.mlflow_name is None:
        return None
    try:
        return metric.mlflow_name.format(**labels)
    except KeyError:
        return None
