"""`lowres models`: the model presets and where their weights come from on this machine."""

from __future__ import annotations

import json
import sys
from typing import Annotated

import typer
from rich.console import Console
from rich.table import Table


def models(
    json_output: Annotated[bool, typer.Option("--json", help="Print the list as JSON.")] = False,
) -> None:
    """List the model presets: size, and where their weights come from here — the Hugging Face cache, an
    installed package (a GGUF converted once into lowres' cache), the hub, or random init (labelled as such)."""
    from lowres.config import DEFAULT_MODEL
    from lowres.models.listing import list_models

    rows = list_models()
    if json_output:
        sys.stdout.write(json.dumps({"default": DEFAULT_MODEL, "models": rows}, indent=2) + "\n")
        return
    t = Table(title=f"model presets (default: {DEFAULT_MODEL})", title_justify="left")
    for col in ("name", "params", "weights here", "from"):
        t.add_column(col, justify="right" if col == "params" else "left", overflow="fold")
    for r in rows:
        size = f" · {r['bytes'] / 1e6:,.0f} MB" if r.get("bytes") else ""
        t.add_row(r["name"], f"{r['params'] / 1e6:,.1f} M", r["source"] + size, r["detail"])
    Console().print(t)
    if any(r["source"] == "package" for r in rows):
        Console().print("package weights: dequantized from a 4-bit GGUF export — near, not equal, to the hub's",
                        highlight=False)


models.context_settings = {"help_option_names": ["-h", "--help"]}
