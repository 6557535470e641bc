"""One benchmark workload in its own process: ``python -m lowres.bench.worker '<json spec>'``.

Prints the result as one JSON line on stdout (last line); `lowres bench` starts one of these per workload so
each workload's peak memory is its own.
"""

from __future__ import annotations

import json
import sys


def main(argv: list[str] | None = None) -> int:
    from lowres.bench.suite import _spec_args, result_json, run_workload
    from lowres.cli.app import _quiet_third_party_noise

    _quiet_third_party_noise()
    spec = json.loads((argv or sys.argv[1:])[0])
    result = run_workload(**_spec_args(spec))
    sys.stdout.write(result_json(result) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
