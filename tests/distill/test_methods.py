"""Methods' hyper-parameter grids: expansion into points, and the checks made when the workflow starts."""

from __future__ import annotations

import hashlib
import json
import re
import shlex

import pytest

from mechdistill.config import load_config, load_schema
from mechdistill.distill.catalog import BASELINES, Setting
from mechdistill.distill.losses import PHASE_WEIGHT, TERMS
from mechdistill.distill.methods import (
    BUDGET_KEYS,
    GRID_KEYS,
    METHODS,
    POINT_PATTERN,
    check_methods,
    grid_point,
    method_grid,
    methods_reading_targets,
)
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
    assert [p.name.split("--")[0] for p in points] == ["alpha=0.5,beta=1.0", "alpha=0.5,beta=2.0", "alpha=1.0,beta=1.0",
                                                       "alpha=1.0,beta=2.0"]
    assert points[2].values == {"alpha": 1.0, "beta": 1.0}
    # the name's hash is that of the values as sorted JSON (the values, not how the config wrote them: 1 is 1.0)
    digest = hashlib.sha1(json.dumps({"alpha": 1.0, "beta": 1.0}, sort_keys=True).encode()).hexdigest()[:8]
    assert points[2].name == f"alpha=1.0,beta=1.0--{digest}"
    # the grid's values replace the entry's weights; the other weights stay; no grid left in the settings
    assert points[1].settings == {"weights": {"alpha": 0.5, "phase1.interaction": 1e-4, "beta": 2.0}}
    assert grid_point("mech", settings, points[3].name) == points[3]
    with pytest.raises(ConfigError, match="no grid point 'alpha=3.0'; its points: alpha=0.5,beta=1.0--"):
        grid_point("mech", settings, "alpha=3.0")


HOSTILE = ["it's $(touch PWNED)", "`touch PWNED`", "a; touch PWNED", '"; touch PWNED; echo "', "$HOME/../x y",
           "a b", "a_b", "-rf", ""]


def test_grid_point_names_are_safe_tokens_whatever_the_values():
    """A point's name is the `{point}` wildcard, a folder and a word of the distill shell command: letters,
    digits and ._,=- only (nothing a shell or a path reads specially), matching the rule's wildcard constraint,
    and distinct for distinct values even where the slug makes them alike ("a b" and "a_b")."""
    points = method_grid("semcot", {"grid": {"params.placeholder": HOSTILE}})
    names = [p.name for p in points]
    assert len(set(names)) == len(HOSTILE)
    for point in points:
        assert re.fullmatch(r"[A-Za-z0-9._,=-]+", point.name) and re.fullmatch(POINT_PATTERN, point.name)
        assert shlex.quote(point.name) == point.name and not point.name.startswith("-")
        assert grid_point("semcot", {"grid": {"params.placeholder": HOSTILE}}, point.name) == point
    assert [p.values["params.placeholder"] for p in points] == HOSTILE  # the values themselves are kept


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


@pytest.mark.parametrize("methods, message", [
    ({"morsd": {"params": {"n_samples": -1}}}, "methods.morsd.params.n_samples is -1; allowed: an integer >= 1."),
    ({"morsd": {"params": {"n_samples": "two"}}}, "methods.morsd.params.n_samples is 'two'; allowed: an integer >= 1."),
    ({"morsd": {"params": {"n_samples": 2.0}}}, "methods.morsd.params.n_samples is 2.0; allowed: an integer >= 1."),
    ({"cwt": {"params": {"n_chunks": 0}}}, "methods.cwt.params.n_chunks is 0; allowed: an integer >= 1."),
    ({"semcot": {"params": {"K": "two"}}}, "methods.semcot.params.K is 'two'; allowed: an integer >= 1."),
    ({"semcot": {"params": {"K": True}}}, "methods.semcot.params.K is True; allowed: an integer >= 1."),
    ({"morsd": {"params": {"min_f1": "best"}}},
     "methods.morsd.params.min_f1 is 'best'; allowed: a number >= 0 and <= 1 or 'greedy'."),
    ({"morsd": {"params": {"max_new_tokens": 0}}},
     "methods.morsd.params.max_new_tokens is 0; allowed: an integer >= 1 or null."),
    ({"cwt": {"params": {"chunking": "even"}}}, "methods.cwt.params.chunking is 'even'; allowed: 'average' or 'search'."),
    ({"unicott": {"params": {"temperature": 0}}}, "methods.unicott.params.temperature is 0; allowed: a number > 0."),
    ({"cwt": {"grid": {"params.n_chunks": [2, "it's $(touch PWNED)"]}}},
     "methods.cwt.grid.params.n_chunks is \"it's $(touch PWNED)\"; allowed: an integer >= 1."),
    ({"semcot": {"grid": {"params.alpha": [0.5, "`touch PWNED`"]}}},
     "methods.semcot.grid.params.alpha is '`touch PWNED`'; allowed: a number >= 0."),
    ({"cwt": {"grid": {"params.skip_from_epoch": [0, -1]}}},
     "methods.cwt.grid.params.skip_from_epoch is -1; allowed: an integer >= 0."),
])
def test_method_settings_are_checked_against_their_declared_type_and_range(methods, message):
    """Before, these were silently coerced (n_samples -1: greedy traces only; n_chunks 0: clamped to 1) or
    failed later with a raw TypeError (n_samples "two" in rules/distill.smk; K "two" inside the job)."""
    with pytest.raises(ConfigError, match=re.escape(message)) as err:
        check_methods(methods, "val_cot_loss", "my.yaml")
    assert str(err.value).startswith("my.yaml: methods.")


def test_every_baseline_setting_declares_its_type_range_and_meaning():
    """One declaration per setting, in one place per method (catalog.BASELINES): its default passes its own
    check; the meaning is said; an unknown type is refused."""
    for baseline in BASELINES.values():
        assert baseline.settings and baseline.defaults == {k: s.default for k, s in baseline.settings.items()}
        for key, setting in baseline.settings.items():
            assert isinstance(setting, Setting) and setting.meaning and setting.problem(setting.default) is None, key
    with pytest.raises(ValueError, match="setting type"):
        Setting(1, "integer", "x")
    with pytest.raises(ValueError, match="default 0"):
        Setting(0, "int", "x", minimum=1)


def test_a_method_plans_teacher_targets_only_when_its_recipe_reads_them():
    """The torch-free Method.needs_targets (what plans teacher_targets) is its recipe's; the baselines read
    none, and distill.targets online reads no file."""
    for name, method in METHODS.items():
        assert method.load_recipe().needs_targets == method.needs_targets, name
    methods = {"vanilla": {}, "mech_strong": {"base": "mech"}, "unicott": {}, "cwt": {}}
    assert methods_reading_targets(methods, "precomputed") == ["vanilla", "mech_strong"]
    assert methods_reading_targets({"unicott": {}, "cwt": {}}, "precomputed") == []
    assert methods_reading_targets(methods, "online") == []


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
