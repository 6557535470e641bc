"""Benchmarks and regression checks: `lowres bench`, `lowres compare`, `lowres regress`.

- ``workloads``: the fixed suites (``quick``, ``full``) and the RunConfig of each workload;
- ``suite``: runs workloads (each in its own process by default, so peak memory is its own) and logs one
  MLflow run per workload with the step-time and peak-memory series;
- ``stats``: Hodges–Lehmann ratios with their distribution-free intervals, Mann–Whitney U;
- ``selection``: what ``--baseline``/``--candidate`` select (run id, git sha, tag filter, latest/previous);
- ``regress``: distributions of baseline vs candidate, only for equal config hash and hardware fingerprint;
- ``compare``: benchmark results across machines and versions, as rows and an optional plot.

Importing this package imports nothing heavy.
"""
