"""Which layers a head pool may draw from, checked against each model's depth before any job runs.

`distill.pools.<phase>.layers` is a band [lo, hi) of fractions of the depth: layer l of an n-layer
model is in it when lo <= l / n < hi. A shallow student can hold no layer of a band (a 1-layer
student has none in the default Phase 2 band [0.33, 1.0)); a method that trains on that phase's
pool then cannot run, and the workflow says so at start-up. Torch-free: the Snakefile imports it.
"""

from __future__ import annotations

from ..errors import ConfigError
from ..model_sources import ModelCatalog, declared_depth
from .methods import resolve_method

PHASES = ("phase1", "phase2")


def layers_in_range(layer_range: tuple[float, float] | list[float], n_layers: int) -> list[int]:
    """The layers l of an `n_layers` model with lo <= l / n_layers < hi."""
    lo, hi = layer_range
    return [layer for layer in range(n_layers) if lo <= layer / n_layers < hi]


def check_pool_ranges(config: dict, source: str = "config") -> None:
    """Every pool a configured method trains on holds at least one layer of the teacher and of each
    student (ConfigError naming the band, the model, its depth and the methods)."""
    for phase in PHASES:
        methods = [name for name, settings in (config.get("methods") or {}).items()
                   if resolve_method(name, settings).uses(phase)]
        if not methods:
            continue
        band, catalog = config["distill"]["pools"][phase]["layers"], ModelCatalog.from_config(config)
        for model in dict.fromkeys([config["teacher"], *config["students"]]):
            depth = declared_depth(catalog, model)
            if depth is not None and not layers_in_range(band, depth):
                raise ConfigError(
                    f"{source}: distill.pools.{phase}.layers is {list(band)}, which holds no layer of {model} "
                    f"({depth} layer(s); layer l is in the band when {band[0]} <= l / {depth} < {band[1]}), and "
                    f"methods {methods} train on the {phase} pool: widen the band (e.g. [0.0, 1.0]), use a deeper "
                    f"model, or drop those methods.")
