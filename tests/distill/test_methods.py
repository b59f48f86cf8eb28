"""Methods' hyper-parameter grids: expansion into points, and the checks made when the workflow starts."""

from __future__ import annotations

import re

import pytest

from mechdistill.config import load_config, load_schema
from mechdistill.distill.losses import PHASE_WEIGHT, TERMS
from mechdistill.distill.methods import BUDGET_KEYS, GRID_KEYS, check_methods, grid_point, method_grid
from mechdistill.distill.train_config import TrainConfig
from mechdistill.errors import ConfigError
from tests.helpers import REPO


def test_a_method_without_grid_is_one_default_point():
    (point,) = method_grid("mech", {"weights": {"alpha": 2.0}, "switches": {"phase2.ov": False}})
    assert point.name == "default" and point.values == {}
    assert point.settings == {"weights": {"alpha": 2.0}, "switches": {"phase2.ov": False}}
    assert [p.name for p in method_grid("vanilla", None)] == ["default"]


def test_grid_points_are_every_combination_first_key_slowest():
    settings = {"weights": {"alpha": 9.0, "phase1.interaction": 1e-4}, "grid": {"alpha": [0.5, 1], "beta": [1.0, 2.0]}}
    points = method_grid("mech", settings)
    assert [p.name for p in points] == ["alpha=0.5,beta=1.0", "alpha=0.5,beta=2.0", "alpha=1.0,beta=1.0",
                                        "alpha=1.0,beta=2.0"]
    assert points[2].values == {"alpha": 1.0, "beta": 1.0}
    # the grid's values replace the entry's weights; the other weights stay; no grid left in the settings
    assert points[1].settings == {"weights": {"alpha": 0.5, "phase1.interaction": 1e-4, "beta": 2.0}}
    assert grid_point("mech", settings, "alpha=1.0,beta=2.0") == points[3]
    with pytest.raises(ConfigError, match="no grid point 'alpha=3.0'; its points: alpha=0.5,beta=1.0, "):
        grid_point("mech", settings, "alpha=3.0")


def test_grid_keys_are_the_loss_weights_and_the_schema_allows_exactly_them():
    weights = {f"{group}.{term}" for group, terms in TERMS.items() for term in terms}
    weights |= {w for w in PHASE_WEIGHT.values() if w}
    assert set(GRID_KEYS) == weights
    schema = load_schema()["$defs"]
    assert set(schema["method"]["properties"]["grid"]["properties"]) == set(GRID_KEYS)
    assert set(BUDGET_KEYS) <= set(schema["train_settings"]["properties"]) and set(BUDGET_KEYS) <= set(
        TrainConfig.__dataclass_fields__)


def test_schema_rejects_a_grid_key_that_is_not_a_loss_weight():
    bad = {"methods": {"mech": {"grid": {"alpha": [0.5, 1.0], "pools.phase1.k": [4, 8]}}}}
    with pytest.raises(ConfigError) as err:
        load_config(REPO / "config" / "tiny.yaml", bad)
    assert (f"unknown key 'pools.phase1.k' under 'methods.mech.grid'. Allowed keys here: "
            f"{', '.join(sorted(GRID_KEYS))}.") in str(err.value)
    with pytest.raises(ConfigError, match="methods.mech.grid.alpha"):
        load_config(REPO / "config" / "tiny.yaml", {"methods": {"mech": {"grid": {"alpha": [1.0, 1.0]}}}})


@pytest.mark.parametrize("methods, criterion, message", [
    ({"vanilla": {"grid": {"beta": [0.5, 1.0]}}}, "val_cot_loss",
     "methods.vanilla.grid.beta: vanilla switches that term off"),
    ({"mech": {"switches": {"phase1.attn": False}, "grid": {"phase1.attn": [1.0, 2.0]}}}, "val_cot_loss",
     "methods.mech.grid.phase1.attn: mech switches that term off"),
    ({"mech": {"grid": {"top_k": [5, 10]}}}, "val_cot_loss", "methods.mech.grid: unknown key 'top_k'"),
    ({"mech": {"train": {"device": "cpu", "lr": 1e-3}}}, "val_cot_loss", "methods.mech.train.lr: the training budget"),
    ({"mech": {"grid": {"alpha": [0.5, 1.0]}}}, "val_loss", "'val_loss' cannot compare grid points"),
])
def test_check_methods_stops_what_the_schema_cannot_see(methods, criterion, message):
    with pytest.raises(ConfigError, match=re.escape(message)):
        check_methods(methods, criterion)


def test_check_methods_accepts_the_shipped_configs_and_a_one_point_grid_under_val_loss():
    for name in ("config.yaml", "tiny.yaml", "paper.yaml"):
        config = load_config(REPO / "config" / name)
        check_methods(config["methods"], config["distill"]["select"]["criterion"])
    check_methods({"mech": {"grid": {"alpha": [0.5]}, "train": {"device": "cpu"}}, "vanilla": {}}, "val_loss")


def test_a_pool_band_without_a_layer_of_a_model_stops_the_start_only_for_methods_that_train_on_it(tiny_config):
    """The 1-layer tiny student has no layer in the default Phase 2 band [0.33, 1.0): mech (which trains on
    that pool) is a start-up error naming the band, the model and its depth; vanilla alone is fine."""
    from mechdistill.distill.pool_ranges import check_pool_ranges, layers_in_range

    assert layers_in_range([0.33, 1.0], 1) == [] and layers_in_range([0.33, 1.0], 3) == [1, 2]
    assert layers_in_range([0.0, 0.5], 10) == [0, 1, 2, 3, 4]
    config = {**tiny_config, "distill": {**tiny_config["distill"],
                                         "pools": {"phase1": {"k": 4, "layers": [0.0, 0.5]},
                                                   "phase2": {"k": 4, "layers": [0.33, 1.0]}}}}
    with pytest.raises(ConfigError) as err:
        check_pool_ranges({**config, "methods": {"vanilla": {}, "mech": {}}}, "tiny.yaml")
    assert ("tiny.yaml: distill.pools.phase2.layers is [0.33, 1.0], which holds no layer of tiny_student (1 layer(s)"
            in str(err.value)) and "methods ['mech']" in str(err.value)
    check_pool_ranges({**config, "methods": {"vanilla": {}, "phase1_only": {}, "unicott": {}}}, "tiny.yaml")
    check_pool_ranges(tiny_config, "tiny.yaml")  # tiny.yaml widens the band: [0.0, 1.0)
    for name in ("config.yaml", "paper.yaml"):
        shipped = load_config(REPO / "config" / name)
        check_pool_ranges(shipped, name)


def test_the_examples_in_the_methods_docstring_pass_the_schema_and_the_start_up_checks():
    import yaml

    from mechdistill.config import validate_config
    from mechdistill.distill import methods

    doc = methods.__doc__
    block = doc[doc.index("    methods:\n"):doc.index("Every method has a kind")]
    grid = doc[doc.index("      semcot: {grid:"):].splitlines()[0]
    entries = {**yaml.safe_load(block)["methods"], **yaml.safe_load(grid.strip())}
    assert set(entries) == {"vanilla", "mech", "mech_strong", "semcot"}
    config = load_config(REPO / "config" / "tiny.yaml")
    config["methods"] = entries
    validate_config(config, "methods.py docstring")
    check_methods(config["methods"], config["distill"]["select"]["criterion"])
    assert len(method_grid("mech", entries["mech"])) == 4 and len(method_grid("semcot", entries["semcot"])) == 3
