"""The train recipe (setup → train → cleanup), its memory-lean loss, checkpoints and MFU.

    from lowres.train import run, Recipe
    result = run(cfg)                           # a whole run
    r = Recipe(cfg, progress=False).setup()     # or N steps in-process (advisor probes, federated clients)
    result = r.train(steps=3); r.cleanup()

Importing this package imports nothing heavy; ``run`` and ``Recipe`` load torch when first used.
"""

from __future__ import annotations


def __getattr__(name: str):
    if name in ("run", "Recipe", "TrainResult"):
        from lowres.train import recipe

        return getattr(recipe, name)
    raise AttributeError(name)


__all__ = ["Recipe", "TrainResult", "run"]
