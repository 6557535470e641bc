"""Every third-party package that lowres, profiler and dashboards import is declared in pyproject.toml.

The AST of every .py file under those folders is walked (imports inside functions and try blocks count: an
optional import is still one some command needs); each top-level import name that is neither the standard
library nor ours is mapped to the distributions that provide it (importlib.metadata.packages_distributions
on the installed environment), and one of them must appear in [project.dependencies] or an extra. A package
that only arrives as another's dependency breaks the day that other package drops it."""

import ast
import importlib.metadata as md
import re
import sys
import tomllib
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
SCANNED = ("lowres", "profiler", "dashboards")


def _norm(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


def declared() -> set[str]:
    """Distribution names in the base dependencies and every extra (normalised, extras and markers dropped)."""
    project = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]
    reqs = list(project.get("dependencies", []))
    for extra in project.get("optional-dependencies", {}).values():
        reqs += extra
    return {_norm(re.match(r"\s*([A-Za-z0-9][A-Za-z0-9._-]*)", r).group(1)) for r in reqs}


def first_party(root: Path = REPO, folders=SCANNED) -> set[str]:
    """Our own top-level names: the scanned folders and every module beside a scanned file (sibling imports)."""
    names = set(folders)
    for folder in folders:
        for path in (root / folder).rglob("*.py"):
            names.add(path.stem)
    return names


def imports(root: Path = REPO, folders=SCANNED) -> dict[str, list[str]]:
    """Top-level name → the files (and lines) importing it, for absolute imports only."""
    found: dict[str, list[str]] = {}
    for folder in folders:
        for path in sorted((root / folder).rglob("*.py")):
            tree = ast.parse(path.read_text(encoding="utf-8"), filename=str(path))
            for node in ast.walk(tree):
                if isinstance(node, ast.Import):
                    names = [a.name for a in node.names]
                elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
                    names = [node.module]
                else:
                    continue
                for name in names:
                    found.setdefault(name.split(".")[0], []).append(f"{path.relative_to(root)}:{node.lineno}")
    return found


def check(root: Path = REPO, folders=SCANNED) -> tuple[dict, dict]:
    """({undeclared import: where}, {import no installed distribution provides: where})."""
    ours, std = first_party(root, folders), set(sys.stdlib_module_names) | {"__future__"}
    providers = md.packages_distributions()
    have = declared()
    undeclared, unknown = {}, {}
    for name, where in sorted(imports(root, folders).items()):
        if name in ours or name in std:
            continue
        dists = {_norm(d) for d in providers.get(name, [])}
        if not dists:
            unknown[name] = where[:2]
        elif not dists & have:
            undeclared[f"{name} (from {', '.join(sorted(dists))})"] = where[:2]
    return undeclared, unknown


def test_every_third_party_import_is_declared():
    undeclared, unknown = check()
    assert not undeclared, f"imported but not declared in pyproject.toml: {undeclared}"
    assert not unknown, f"imported but installed by no distribution here (a typo, or declare and install it): {unknown}"


def test_the_check_sees_an_undeclared_import(tmp_path):
    # the test above must be able to fail: imports no extra declares, inside a function or a try, are caught
    pytest.importorskip("pygments")
    pkg = tmp_path / "pkg"
    (pkg / "sub").mkdir(parents=True)
    (pkg / "sub" / "mod.py").write_text("import os\nfrom pkg import sub\nimport psutil\n\n\ndef f():\n"
                                        "    try:\n        from pygments.lexers import x\n    except ImportError:\n"
                                        "        import no_such_package_anywhere\n")
    undeclared, unknown = check(tmp_path, ("pkg",))
    assert undeclared == {"pygments (from pygments)": ["pkg/sub/mod.py:8"]}
    assert list(unknown) == ["no_such_package_anywhere"]
