"""docker/: no engine runs here, so the compose file and the Dockerfiles are parsed and held to the rules the
stack depends on: services and their wiring, loopback-only ports, mounts of files that exist, secrets from
the environment, pinned images and torch, an unprivileged user."""

from __future__ import annotations

import re
import shlex
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[1]
DOCKER = ROOT / "docker"
SERVICES = {"lowres", "mlflow", "postgres", "prometheus", "pushgateway", "grafana", "streamlit"}
SECRET_KEY = re.compile(r"PASSWORD|SECRET|TOKEN|_KEY$|CREDENTIAL", re.I)


def _compose() -> dict:
    return yaml.safe_load((DOCKER / "compose.yml").read_text())


def _env(service: dict) -> dict[str, str]:
    env = service.get("environment") or {}
    if isinstance(env, list):  # the KEY=value list form
        env = dict(item.split("=", 1) if "=" in item else (item, None) for item in env)
    return env


def _binds(service: dict) -> list[tuple[str, str]]:
    """(source, target) of each bind mount; named volumes (no path separator) are left out."""
    out = []
    for v in service.get("volumes") or []:
        source, target = (v["source"], v["target"]) if isinstance(v, dict) else v.split(":")[:2]
        if source.startswith((".", "/")):
            out.append((source, target))
    return out


def instructions(path: Path) -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) of a Dockerfile: comments dropped, continuation lines joined."""
    out, pending = [], ""
    for line in path.read_text().splitlines():
        stripped = line.strip()
        if not pending and (not stripped or stripped.startswith("#")):
            continue
        if stripped.startswith("#"):  # a comment inside a continued instruction
            continue
        pending += " " + stripped.rstrip("\\").strip()
        if not stripped.endswith("\\"):
            word, _, args = pending.strip().partition(" ")
            out.append((word.upper(), args.strip()))
            pending = ""
    assert not pending, f"{path.name}: the last instruction ends with a continuation backslash"
    return out


# -- compose -----------------------------------------------------------------------------------------------
def test_compose_has_the_whole_stack():
    compose = _compose()
    assert set(compose["services"]) == SERVICES
    declared = set(compose.get("volumes") or {})
    for name, service in compose["services"].items():
        assert "image" in service or "build" in service, name
        for v in service.get("volumes") or []:
            source = v.split(":")[0] if isinstance(v, str) else v["source"]
            if not source.startswith((".", "/")):
                assert source in declared, f"{name}: named volume {source!r} is not declared"


def test_published_ports_are_bound_to_loopback():
    published = {}
    for name, service in _compose()["services"].items():
        for port in service.get("ports") or []:
            spec = port if isinstance(port, str) else f"{port.get('host_ip', '')}:{port['published']}:{port['target']}"
            assert str(spec).startswith("127.0.0.1:"), f"{name}: port {port!r} is not bound to 127.0.0.1"
            published[name] = int(str(spec).split(":")[1])
    # what the READMEs promise a browser on this machine
    assert published == {"mlflow": 5000, "prometheus": 9090, "pushgateway": 9091, "grafana": 3000,
                         "streamlit": 8501}


def test_bind_mounts_point_at_files_in_the_repository():
    services = _compose()["services"]
    for name, service in services.items():
        for source, _ in _binds(service):
            assert (DOCKER / source).resolve().exists(), f"{name}: mount source {source} does not exist"
            assert (DOCKER / source).resolve().is_relative_to(ROOT), f"{name}: {source} is outside the repo"
    # The mounts are where each server reads its files.
    assert dict(_binds(services["prometheus"]))["../dashboards/prometheus"] == "/etc/prometheus"
    assert "--config.file=/etc/prometheus/prometheus.yml" in services["prometheus"]["command"]
    grafana = dict(_binds(services["grafana"]))
    assert grafana["../dashboards/grafana/provisioning"] == "/etc/grafana/provisioning"
    provider = yaml.safe_load((ROOT / "dashboards/grafana/provisioning/dashboards/lowres.yml").read_text())
    assert grafana["../dashboards/grafana/dashboards"] == provider["providers"][0]["options"]["path"]
    datasource = yaml.safe_load((ROOT / "dashboards/grafana/provisioning/datasources/prometheus.yml").read_text())
    assert datasource["datasources"][0]["url"] == "http://prometheus:9090"
    assert "pushgateway:9091" in (ROOT / "dashboards/prometheus/prometheus.yml").read_text()


def test_secrets_come_from_variables_never_literals():
    compose_text = (DOCKER / "compose.yml").read_text()
    for name, service in _compose()["services"].items():
        for key, value in _env(service).items():
            if SECRET_KEY.search(key):
                # `${VAR:?message}`: compose refuses to start without it instead of using a default
                assert re.fullmatch(r"\$\{\w+:\?[^}]*\}", str(value)), f"{name}: {key} must be ${{VAR:?…}}"
            # A password inside a URI (scheme://user:password@host) ends up in logs and `ps`; libpq and
            # friends read it from their own variable instead. `${VAR:-default}` is not a password.
            plain = re.sub(r"\$\{[^}]*\}", "VAR", str(value))
            assert not re.search(r"://[^/@\s]+:[^/@\s]+@", plain), f"{name}: {key} has credentials in a URI"
    assert not re.search(r"://[^/@\s]+:[^/@\s]+@", re.sub(r"\$\{[^}]*\}", "VAR", compose_text))


def test_images_are_pinned_and_builds_exist():
    for name, service in _compose()["services"].items():
        image = service.get("image", "")
        if "build" in service:
            build = service["build"]
            context = (DOCKER / build["context"]).resolve()
            assert context == ROOT, f"{name}: the Dockerfiles COPY repo paths, so the context is the repo root"
            assert (context / build["dockerfile"]).is_file(), f"{name}: {build['dockerfile']} is missing"
        tag = image.rpartition(":")[2] if ":" in image.rpartition("/")[2] else ""
        assert tag and tag != "latest", f"{name}: image {image!r} needs a pinned tag"


# -- Dockerfiles -------------------------------------------------------------------------------------------
@pytest.mark.parametrize("name,index", [("Dockerfile", "whl/cpu"), ("Dockerfile.cuda", "whl/${TORCH_CUDA}")])
def test_dockerfile_is_pinned_unprivileged_and_copies_what_exists(name, index):
    steps = instructions(DOCKER / name)
    assert steps and steps[0][0] in ("FROM", "ARG"), f"{name}: must start with FROM (or ARG before it)"
    froms = [args.split()[0] for word, args in steps if word == "FROM"]
    assert froms, f"{name}: no FROM"
    for image in froms:
        assert "@sha256:" in image or re.search(r":[\w.-]+$", image.rpartition("/")[2]), f"{image}: no tag"
        assert not image.endswith(":latest"), f"{name}: {image} uses latest"

    runs = [args for word, args in steps if word == "RUN"]
    torch = [r for r in runs if re.search(r"\btorch\b", r)]
    assert torch and all("torch==2.13.0" in r for r in torch), f"{name}: torch must be pinned to 2.13.0: {torch}"
    assert any(f"https://download.pytorch.org/{index}" in r for r in torch), f"{name}: torch not from {index}"
    assert any(re.search(r"pip install [\"']?\.\[all\]", r) for r in runs), f"{name}: lowres[all] is not installed"
    first_torch = next(i for i, (w, a) in enumerate(steps) if w == "RUN" and "torch==" in a)
    first_lowres = next(i for i, (w, a) in enumerate(steps) if w == "RUN" and ".[all]" in a)
    assert first_torch < first_lowres, f"{name}: the pinned torch must be installed before lowres pulls any"

    users = [args for word, args in steps if word == "USER"]
    assert users and users[-1].split(":")[0] not in ("root", "0"), f"{name}: the image must end as a non-root USER"

    for word, args in steps:
        if word in ("COPY", "ADD"):
            parts = [p for p in shlex.split(args) if not p.startswith("--")]
            assert word == "COPY", f"{name}: ADD fetches and unpacks implicitly; use COPY"
            for source in parts[:-1]:
                assert (ROOT / source).exists(), f"{name}: COPY source {source} is not in the repository"
    assert "latest" not in " ".join(a for w, a in steps if w == "FROM")
