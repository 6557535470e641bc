"""The deployment engine: a SuperLink, SuperNodes and ``flwr run``, as commands lowres builds and starts.

    lowres fed superlink [--port 8000] [--certs DIR | --insecure] [--supernode-auth]
    lowres fed supernode --superlink HOST:PORT --partition-id 0 --num-partitions 2 [--data-path FILE]
                         [--overrides "lora.rank=4"] [--root-cert ca.crt | --insecure] [--auth-key node.key]
    lowres fed run --config configs/fed/tiny-deploy.yaml --superlink HOST:PORT [--insecure | --root-cert ca.crt]

Each builds the flwr command line (``superlink_command`` etc.), so the equivalent plain Flower commands are
visible with ``--dry-run``:

    flower-superlink --ssl-ca-certfile ca.crt --ssl-certfile server.pem --ssl-keyfile server.key \\
        --port 8000 --disable-runtime-dependency-installation [--enable-supernode-auth]
    flower-supernode --root-certificates ca.crt --superlink link:8000 --port 9094 \\
        --auth-supernode-private-key node.key --auth-supernode-public-key node.key.pub \\
        --node-config 'partition-id=0 num-partitions=2 data-path="/data/mine.jsonl"'
    flwr run <lowres/federated/flower_app> <connection> --run-config 'fed-config="/abs/fed.yaml"'

TLS: the SuperLink serves one HTTPS port with ``--ssl-*`` (a CA, its certificate and key; ``make_certs``
writes a self-signed set for loopback tests with the ``cryptography`` package), SuperNodes and ``flwr run``
trust the CA (``--root-certificates`` / ``root-certificates`` in the connection). SuperNode
authentication: start the SuperLink with ``--enable-supernode-auth``; register each node's public key with
``flwr supernode register <node.key.pub> . <connection>`` and start the node with its key pair
(``--auth-supernode-private-key/--auth-supernode-public-key``); unregistered nodes are refused.

Runtime dependency installation is off: nodes of a lab have lowres installed, and machines without
internet would otherwise fail on ``uv sync``. The SuperLink and SuperNodes start ``flower-superexec`` by name,
so it must be on PATH: ``flower_env`` puts the venv's bin folder first (and, for an install without the
``flower-*`` console scripts, small shims calling the same entry points).
"""

from __future__ import annotations

import os
import shutil
import sys
from pathlib import Path

APP_DIR = Path(__file__).resolve().parent / "flower_app"
SCRIPTS = {  # console script → entry point, as in flwr's entry_points.txt
    "flower-superlink": "flwr.superlink.cli:flower_superlink",
    "flower-supernode": "flwr.supernode.cli:flower_supernode",
    "flower-superexec": "flwr.supercore.cli:flower_superexec",
    "flwr-serverapp": "flwr.superlink.cli:flwr_serverapp",
    "flwr-clientapp": "flwr.supernode.cli:flwr_clientapp",
    "flwr": "flwr.cli.app:app",
}


def flower_env(shim_dir: str | Path, base: dict | None = None) -> dict[str, str]:
    """An environment whose PATH finds every Flower console script (shims in ``shim_dir`` for missing ones)
    and with Flower's telemetry and update check off (machines may be offline)."""
    env = dict(os.environ if base is None else base)
    env.setdefault("FLWR_TELEMETRY_ENABLED", "0")
    env.setdefault("FLWR_DISABLE_UPDATE_CHECK", "1")
    env["FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION"] = "1"
    venv_bin = str(Path(sys.executable).parent)
    path = venv_bin + os.pathsep + env.get("PATH", "")
    missing = [name for name in SCRIPTS if shutil.which(name, path=path) is None]
    if missing:
        d = Path(shim_dir)
        d.mkdir(parents=True, exist_ok=True)
        for name in missing:
            module, func = SCRIPTS[name].split(":")
            shim = d / name
            shim.write_text(f"#!{sys.executable}\nimport sys\nfrom {module} import {func}\n"
                            f"sys.argv[0] = {name!r}\nsys.exit({func}())\n")
            shim.chmod(0o755)
        path = str(d) + os.pathsep + path
    env["PATH"] = path
    return env


def tls_args_server(certs: str | Path | None) -> list[str]:
    if certs is None:
        return ["--insecure"]
    c = Path(certs)
    return ["--ssl-ca-certfile", str(c / "ca.crt"), "--ssl-certfile", str(c / "server.pem"),
            "--ssl-keyfile", str(c / "server.key")]


def superlink_command(port: int, certs: str | Path | None = None, supernode_auth: bool = False,
                      database: str | None = None) -> list[str]:
    """``flower-superlink`` serving its one HTTP(S) port on 127.0.0.1 (``--host`` to widen)."""
    cmd = ["flower-superlink", *tls_args_server(certs), "--port", str(port), "--disable-runtime-dependency-installation"]
    if supernode_auth:
        cmd.append("--enable-supernode-auth")
    if database:
        cmd += ["--database", database]
    return cmd


def supernode_command(superlink: str, port: int, node_config: dict[str, object], root_cert: str | None = None,
                      auth_key: str | None = None) -> list[str]:
    """``flower-supernode`` connecting to ``superlink`` with its own ``node_config`` (partition-id, data-path,
    lowres-overrides, lowres-threads)."""
    cmd = ["flower-supernode", *(["--root-certificates", root_cert] if root_cert else ["--insecure"]),
           "--superlink", superlink, "--port", str(port), "--node-config", node_config_text(node_config)]
    if auth_key:
        cmd += ["--auth-supernode-private-key", auth_key, "--auth-supernode-public-key", auth_key + ".pub"]
    return cmd


def node_config_text(node_config: dict[str, object]) -> str:
    """``k=v`` pairs as flwr parses them (TOML values: strings quoted)."""
    parts = []
    for k, v in node_config.items():
        parts.append(f'{k}={v}' if isinstance(v, (int, float)) and not isinstance(v, bool) else f'{k}="{v}"')
    return " ".join(parts)


def write_connection(flwr_home: str | Path, name: str, address: str, root_cert: str | None = None) -> Path:
    """A SuperLink connection ``name`` in ``$FLWR_HOME/config.toml`` for ``flwr run/list/stop``."""
    home = Path(flwr_home)
    home.mkdir(parents=True, exist_ok=True)
    lines = ["[superlink]", f'default = "{name}"', "", f"[superlink.{name}]", f'address = "{address}"']
    lines.append(f'root-certificates = "{root_cert}"' if root_cert else "insecure = true")
    path = home / "config.toml"
    path.write_text("\n".join(lines) + "\n")
    return path


def run_command(connection: str, fed_config: str | Path, overrides: list[str] | None = None,
                stream: bool = False) -> list[str]:
    """``flwr run`` of lowres' Flower app against ``connection``, for the federation YAML ``fed_config``."""
    cfg = f'fed-config="{Path(fed_config).resolve()}"'
    if overrides:  # a TOML literal string: overrides may hold double quotes (-o / --tracking-uri are JSON-quoted)
        cfg += f" fed-overrides='{' '.join(overrides)}'"
    cmd = ["flwr", "run", str(APP_DIR), connection, "--run-config", cfg, "--format", "json"]
    return cmd + (["--stream"] if stream else [])


def make_certs(folder: str | Path, host: str = "127.0.0.1") -> Path:
    """A self-signed CA and a server certificate for ``host`` (loopback tests of TLS); returns ``folder``."""
    import datetime
    import ipaddress

    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import NameOID

    d = Path(folder)
    d.mkdir(parents=True, exist_ok=True)
    now = datetime.datetime.now(datetime.timezone.utc)

    def name(cn: str):
        return x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, cn)])

    ca_key = ec.generate_private_key(ec.SECP256R1())
    ca = (x509.CertificateBuilder().subject_name(name("lowres test CA")).issuer_name(name("lowres test CA"))
          .public_key(ca_key.public_key()).serial_number(x509.random_serial_number())
          .not_valid_before(now - datetime.timedelta(minutes=5)).not_valid_after(now + datetime.timedelta(days=2))
          .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
          .sign(ca_key, hashes.SHA256()))
    key = ec.generate_private_key(ec.SECP256R1())
    try:
        san = [x509.IPAddress(ipaddress.ip_address(host))]
    except ValueError:
        san = [x509.DNSName(host)]
    cert = (x509.CertificateBuilder().subject_name(name(host)).issuer_name(ca.subject).public_key(key.public_key())
            .serial_number(x509.random_serial_number()).not_valid_before(now - datetime.timedelta(minutes=5))
            .not_valid_after(now + datetime.timedelta(days=2))
            .add_extension(x509.SubjectAlternativeName(san + [x509.DNSName("localhost")]), critical=False)
            .sign(ca_key, hashes.SHA256()))
    pem = serialization.Encoding.PEM
    (d / "ca.crt").write_bytes(ca.public_bytes(pem))
    (d / "server.pem").write_bytes(cert.public_bytes(pem))
    # the private key is readable by its owner only (0600), from its first byte: created with that mode
    fd = os.open(d / "server.key", os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    os.fchmod(fd, 0o600)  # an existing file keeps its old mode through O_CREAT
    with os.fdopen(fd, "wb") as f:
        f.write(key.private_bytes(pem, serialization.PrivateFormat.TraditionalOpenSSL, serialization.NoEncryption()))
    return d


def _flwr_json(cmd: list[str], env: dict[str, str], timeout: float) -> dict:
    import json
    import subprocess

    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=timeout)
    start = proc.stdout.find("{")
    try:
        out = json.loads(proc.stdout[start:]) if start >= 0 else {}
    except json.JSONDecodeError:
        out = {}
    if proc.returncode != 0 or not out.get("success", False):
        from lowres.federated.server import FederationError

        raise FederationError(f"`{' '.join(cmd[:3])} …` failed (exit {proc.returncode}): "
                              f"{(out.get('error-message') or proc.stderr or proc.stdout).strip()[-500:]}")
    return out


def submit(fed_config: str | Path, address: str, flwr_home: str | Path, root_cert: str | None = None,
           overrides: list[str] | None = None, timeout: float = 120) -> str:
    """``flwr run`` the federation on the SuperLink at ``address``; returns Flower's run id (the ServerApp
    then runs inside the SuperLink's SuperExec, logging to MLflow and Prometheus itself)."""
    write_connection(flwr_home, "lowres", address, root_cert)
    env = flower_env(Path(flwr_home) / "bin", {**os.environ, "FLWR_HOME": str(flwr_home)})
    return str(_flwr_json(run_command("lowres", fed_config, overrides), env, timeout)["run-id"])


def run_status(run_id: str, flwr_home: str | Path, timeout: float = 60) -> dict:
    """Flower's record of a run (``flwr list --run-id``): status, elapsed, network-traffic bytes."""
    env = flower_env(Path(flwr_home) / "bin", {**os.environ, "FLWR_HOME": str(flwr_home)})
    out = _flwr_json(["flwr", "list", "lowres", "--run-id", str(run_id), "--format", "json"], env, timeout)
    runs = out.get("runs", [])
    return runs[0] if runs else {}


def wait_finished(run_id: str, flwr_home: str | Path, timeout_s: float, poll_s: float = 2.0) -> dict:
    """Poll ``run_status`` until the run's status starts with ``finished``; FederationError after ``timeout_s``."""
    import time

    deadline = time.monotonic() + timeout_s
    status: dict = {}
    while time.monotonic() < deadline:
        status = run_status(run_id, flwr_home)
        if str(status.get("status", "")).startswith("finished"):
            return status
        time.sleep(poll_s)
    from lowres.federated.server import FederationError

    raise FederationError(f"run {run_id} not finished after {timeout_s:g} s (last status {status.get('status')!r})")


def make_node_key(path: str | Path) -> Path:
    """An ECDSA key pair for SuperNode authentication: ``path`` (OpenSSH private key) and ``path.pub``
    (register it with ``flwr supernode register path.pub <connection>``); returns ``path``."""
    from cryptography.hazmat.primitives import serialization
    from cryptography.hazmat.primitives.asymmetric import ec

    p = Path(path)
    p.parent.mkdir(parents=True, exist_ok=True)
    key = ec.generate_private_key(ec.SECP384R1())
    p.write_bytes(key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.OpenSSH,
                                    serialization.NoEncryption()))
    p.chmod(0o600)
    Path(str(p) + ".pub").write_bytes(key.public_key().public_bytes(serialization.Encoding.OpenSSH,
                                                                    serialization.PublicFormat.OpenSSH))
    return p


def register_node(public_key: str | Path, flwr_home: str | Path, timeout: float = 60) -> dict:
    """``flwr supernode register`` a node's public key with the SuperLink of the ``lowres`` connection."""
    env = flower_env(Path(flwr_home) / "bin", {**os.environ, "FLWR_HOME": str(flwr_home)})
    return _flwr_json(["flwr", "supernode", "register", str(public_key), "lowres", "--format", "json"], env, timeout)


def list_nodes(flwr_home: str | Path, timeout: float = 60) -> list[dict]:
    """``flwr supernode list`` of the ``lowres`` connection: node id, status (online/offline/registered)."""
    env = flower_env(Path(flwr_home) / "bin", {**os.environ, "FLWR_HOME": str(flwr_home)})
    return _flwr_json(["flwr", "supernode", "list", "lowres", "--format", "json"], env, timeout).get("nodes", [])
