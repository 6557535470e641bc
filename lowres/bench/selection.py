"""What `lowres regress --baseline SEL --candidate SEL` selects.

A selector is one of:

- ``latest``: the newest finished run of the experiment and, if it came from `lowres bench`, every run of
  that bench invocation (its ``lowres.bench.session`` tag);
- ``previous``: for each run the *other* side selected, the newest finished run before it with the same
  config hash and hardware fingerprint (so ``--baseline previous --candidate latest`` is the CI check);
- a run id (32 hex digits);
- a git sha or a prefix of one (7–40 hex digits): the runs tagged ``lowres.git_sha`` with it;
- an MLflow filter, e.g. ``tags.lowres.git_sha='abc1234…'`` or ``tags.lowres.bench.session = 's1'``.
"""

from __future__ import annotations

import re

from lowres.errors import UsageError
from lowres.tracking.runs import TAG_CONFIG_HASH, TAG_FINGERPRINT, TAG_GIT_SHA

RELATIVE = ("latest", "previous")
_FILTER_WORDS = re.compile(r"(=|!=|\bLIKE\b|\bILIKE\b|\bIN\b|[<>])", re.IGNORECASE)
_MAX_RUNS = 5000


class SelectionError(UsageError):
    """A selector matched nothing, could not be read, or matched runs that cannot be compared (exit 2)."""


def run_key(run) -> tuple[str | None, str | None]:
    """(config hash, hardware fingerprint): only runs with equal keys are compared."""
    return run.data.tags.get(TAG_CONFIG_HASH), run.data.tags.get(TAG_FINGERPRINT)


def select(client, experiment_ids: list[str], selector: str, other: list | None = None) -> list:
    """The runs ``selector`` names (see the module docstring); ``other`` is the opposite side, for ``previous``."""
    sel = selector.strip()
    if sel == "latest":
        return _latest(client, experiment_ids)
    if sel == "previous":
        if not other:
            raise SelectionError("`previous` is relative to the other side's runs, which selected nothing",
                                 hint="pair it with latest, a run id or a git sha (e.g. --baseline previous "
                                      "--candidate latest)")
        return _previous(client, experiment_ids, other)
    if re.fullmatch(r"[0-9a-f]{32}", sel):
        try:
            return [client.get_run(sel)]
        except Exception:  # not a run id here: it may still be a git sha prefix
            pass
    if re.fullmatch(r"[0-9a-fA-F]{7,40}", sel):
        found = _search(client, experiment_ids, f"tags.`{TAG_GIT_SHA}` LIKE '{sel.lower()}%'")
        if not found:
            raise SelectionError(f"no run has id {sel} or a git sha starting with it",
                                 hint="`lowres compare` lists the runs; check --experiment")
        return found
    if _FILTER_WORDS.search(sel):
        found = _search(client, experiment_ids, sel)
        if not found:
            raise SelectionError(f"the filter {sel!r} matches no run", hint="check --experiment and the tag names")
        return found
    raise SelectionError(f"cannot read the selector {sel!r}",
                         hint="use a run id, a git sha, a filter like tags.lowres.git_sha='abc1234', "
                              "latest or previous")


def _search(client, experiment_ids: list[str], filter_string: str = "", max_results: int = _MAX_RUNS) -> list:
    try:
        return list(client.search_runs(experiment_ids, filter_string=filter_string, max_results=max_results,
                                       order_by=["attributes.start_time DESC"]))
    except Exception as exc:  # a malformed filter: MLflow says what is wrong
        raise SelectionError(f"MLflow could not search with {filter_string!r}: {str(exc)[:300]}") from None


def _latest(client, experiment_ids: list[str]) -> list:
    from lowres.bench.suite import TAG_SESSION

    newest = _search(client, experiment_ids, "attributes.status = 'FINISHED'", max_results=1)
    if not newest:
        raise SelectionError("`latest`: the experiment has no finished run", hint="run `lowres bench` first")
    session = newest[0].data.tags.get(TAG_SESSION)
    if session is None:
        return newest
    return _search(client, experiment_ids, f"attributes.status = 'FINISHED' and tags.`{TAG_SESSION}` = '{session}'")


def _previous(client, experiment_ids: list[str], other: list) -> list:
    taken = {r.info.run_id for r in other}
    out: dict[str, object] = {}
    for run in other:
        config, fingerprint = run_key(run)
        if config is None or fingerprint is None:
            continue
        earlier = _search(client, experiment_ids,
                          f"attributes.status = 'FINISHED' and tags.`{TAG_CONFIG_HASH}` = '{config}' and "
                          f"tags.`{TAG_FINGERPRINT}` = '{fingerprint}' and "
                          f"attributes.start_time < {run.info.start_time}", max_results=len(taken) + 1)
        earlier = [r for r in earlier if r.info.run_id not in taken]
        if earlier:
            out[earlier[0].info.run_id] = earlier[0]
    if not out:
        raise SelectionError("`previous`: no earlier finished run has the same config hash and hardware "
                             "fingerprint as the other side's runs",
                             hint="run the same benchmark on this machine first, or name a baseline run")
    return list(out.values())
