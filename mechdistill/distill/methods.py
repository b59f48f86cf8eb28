"""Distillation methods by name (the `{method}` wildcard values): their kind, loss-term switches and recipe.

A method is a name, a kind and the module of its `Recipe` (`distill/recipe.py`: what it trains on
and its loss; imported, with torch, only by the jobs that train). vanilla, mech and the ablations
share one recipe (`distill/mech.py`) and differ by their switches over the terms of
`losses.total_loss` (groups "cot", "phase1", "phase2"; terms "phase1.attn", "phase1.write",
"phase1.interaction", "phase2.qk", "phase2.ov", "phase2.interaction", "cot.ce", "cot.kl").
`config["methods"]` maps a method name to settings; the name is looked up here unless the settings
give `base:`:

    methods:
      vanilla: {}                                         # CoT loss only
      mech: {grid: {alpha: [0.5, 1.0], beta: [0.5, 1.0]}}  # the paper's method, 4 grid points
      mech_strong: {base: mech, weights: {alpha: 5.0}}

Every method has a kind, which decides where it is compared:

    baseline   a CoT-distillation method ours is compared with (vanilla; UniCoTT, MoRSD, SemCoT, CWT)
    ours       the paper's method (mech): the row that gets "Δ vs best baseline" in Tables 1-4
    ablation   ours with a phase or a term switched off (Figure 9), never a baseline

A method's `grid:` maps loss weights (`GRID_KEYS`) to the values to try; every combination is a
grid point (`method_grid`), trained by its own `distill` job in `{method}/grid/{point}/`, and
`select_distill` publishes the point with the best validation value as the method's model. No
grid is a grid of one point, "default". The training budget and optimisation (`BUDGET_KEYS` of
`distill.train`) are the same for every method and grid point: neither a grid nor a method's
`train:` may change them (`check_methods`, run when the workflow starts).

The four CoT-distillation baselines (UniCoTT, MoRSD, SemCoT, CWT) are registered here with kind
"baseline", their `catalog.Baseline` (`distill.baselines`: settings, teacher needs) and their recipe
module, which says what they train on, their loss and, for some, extra teacher data and their own
inference. Their settings are the entry's `params:` (the baseline's
`defaults` overridden), and their grid may vary a setting as `params.<name>`:

      semcot: {grid: {params.alpha: [0.25, 0.5, 0.75]}}
"""

from __future__ import annotations

import hashlib
import importlib
import itertools
import json
import re
from dataclasses import dataclass, field, replace
from typing import Any

from ..errors import ConfigError
from .catalog import BASELINES, Baseline

BASELINES_PACKAGE = "mechdistill.distill.baselines"

METHOD_KINDS = ("baseline", "ours", "ablation")
MECH_RECIPE = "mechdistill.distill.mech"  # the recipe of vanilla, mech and the ablations


@dataclass(frozen=True)
class Method:
    name: str
    switches: dict[str, bool] = field(default_factory=dict)
    description: str = ""
    kind: str = "ablation"        # baseline | ours | ablation (module docstring)
    baseline: Baseline | None = None  # one of the four baselines (its settings and teacher needs)
    recipe: str = MECH_RECIPE     # the module whose RECIPE trains it
    needs_targets: bool | None = None  # its recipe reads the teacher's targets (Recipe.needs_targets, a torch-free
    #                                  copy that plans teacher_targets; checked when the recipe loads); None: the mech
    #                                  recipe's True, any other recipe's False (Recipe's default)

    def __post_init__(self) -> None:
        if self.kind not in METHOD_KINDS:
            raise ValueError(f"method {self.name!r}: kind must be one of {METHOD_KINDS}, got {self.kind!r}")
        if self.needs_targets is None:
            object.__setattr__(self, "needs_targets", self.recipe == MECH_RECIPE)

    def load_recipe(self) -> Any:
        """The method's `recipe.Recipe` (the RECIPE of module `self.recipe`); imports torch. (Not annotated
        as Recipe: recipe.py imports this module, and the import contract forbids cycles.) Its needs_targets
        must be this method's, which plans the teacher_targets jobs without torch."""
        recipe = importlib.import_module(self.recipe).RECIPE
        if recipe.needs_targets != self.needs_targets:
            raise ValueError(f"method {self.name!r}: needs_targets is {self.needs_targets}, but its recipe "
                             f"{self.recipe} says {recipe.needs_targets}")
        return recipe

    def uses(self, phase: str) -> bool:
        """Whether any term of `phase` ("phase1" / "phase2") is on."""
        if self.baseline is not None:
            return False
        if not self.switches.get(phase, True):
            return False
        terms = {"phase1": ("attn", "write", "interaction"), "phase2": ("qk", "ov", "interaction")}[phase]
        return any(self.switches.get(f"{phase}.{t}", True) for t in terms)


METHODS: dict[str, Method] = {}


def register_method(method: Method) -> Method:
    if method.name in METHODS:
        raise ValueError(f"method {method.name!r} is already registered")
    METHODS[method.name] = method
    return method


for _m in [
    Method("vanilla", {"phase1": False, "phase2": False}, "CoT loss only (CE + KL to the teacher's top-k)",
           kind="baseline"),
    Method("mech", {}, "CoT + Phase 1 + Phase 2 losses", kind="ours"),
    Method("phase1_only", {"phase2": False}, "CoT + Phase 1 losses"),
    Method("phase2_only", {"phase1": False}, "CoT + Phase 2 losses"),
    Method("no_p1_attn", {"phase1.attn": False}, "mech without the Phase 1 attention KL"),
    Method("no_p1_write", {"phase1.write": False}, "mech without the Phase 1 write alignment"),
    Method("no_p1_interaction", {"phase1.interaction": False}, "mech without the Phase 1 interaction term"),
    Method("no_p2_qk", {"phase2.qk": False}, "mech without the Phase 2 QK loop-back term"),
    Method("no_p2_ov", {"phase2.ov": False}, "mech without the Phase 2 OV helpfulness term"),
    Method("no_p2_interaction", {"phase2.interaction": False}, "mech without the Phase 2 interaction term"),
    *(Method(b.name, {}, b.description, kind="baseline", baseline=b, recipe=f"{BASELINES_PACKAGE}.{b.name}")
      for b in BASELINES.values()),
]:
    register_method(_m)


def resolve_method(name: str, settings: dict | None) -> Method:
    """The registered method behind config entry `name` (settings may name a `base`), with the
    entry's extra `switches` applied. Its kind is the base's unless the entry sets `kind`."""
    settings = settings or {}
    base = settings.get("base", name)
    if base not in METHODS:
        key = f"methods.{name}.base" if "base" in settings else f"methods.{name}"
        raise ConfigError(f"{key}: unknown method {base!r}; registered: {sorted(METHODS)} "
                          f"(give `base:` to name one of them)")
    method = METHODS[base]
    extra, kind = settings.get("switches") or {}, settings.get("kind", method.kind)
    if extra or base != name or kind != method.kind:
        return replace(method, name=name, switches={**method.switches, **extra}, kind=kind)
    return method


def methods_reading_targets(methods: dict[str, dict | None], targets: str) -> list[str]:
    """The config entries whose distill jobs read the teacher_targets files: those whose recipe needs the
    teacher's targets, when `targets` (distill.targets) is "precomputed" (online: the job's teacher makes them)."""
    if targets != "precomputed":
        return []
    return [name for name, settings in methods.items() if resolve_method(name, settings).needs_targets]


def needs_teacher_data(name: str, settings: dict | None) -> bool:
    """Whether config entry `name` is a baseline whose settings ask the teacher for extra data, made
    by a `baseline_teacher_data` job (UniCoTT's chain and SemCoT's heuristic condensing need none)."""
    baseline = resolve_method(name, settings).baseline
    return baseline is not None and baseline.asks_teacher(baseline.params((settings or {}).get("params")))


def method_kinds(methods: dict[str, dict | None]) -> dict[str, str]:
    """config["methods"] -> {name: kind}, in config order."""
    return {name: resolve_method(name, settings).kind for name, settings in methods.items()}


# ----------------------------------------------------------------------------- hyper-parameter grids

# What a grid may vary: the loss weights (the keys of distill.weights). Not the pools, top_k or the KL
# temperature (the teacher targets are computed once per teacher with them, and the temperature
# changes the CoT loss that selects), nor anything of distill.train (BUDGET_KEYS).
GRID_KEYS = ("alpha", "beta", "cot.ce", "cot.kl", "phase1.attn", "phase1.write", "phase1.interaction",
             "phase2.qk", "phase2.ov", "phase2.interaction")
# distill.train settings every method and grid point shares ("training budget and optimization fixed
# across methods"); a method's `train:` may set only the others (device, precision, checkpoint_every, ...).
BUDGET_KEYS = ("lr", "weight_decay", "betas", "adam_eps", "warmup_steps", "warmup_ratio", "min_lr_ratio",
               "max_steps", "grad_accum_steps", "micro_batch_size", "max_grad_norm", "eval_every")
DEFAULT_POINT = "default"  # the one point of a method without a grid
PARAMS = "params."  # grid keys of a baseline's own settings: params.<name>
PHASE_OF_WEIGHT = {"alpha": "phase1", "beta": "phase2"}


# A grid point's name (the `{point}` wildcard, a folder name and a word of the `distill` shell command): the
# point's values as a slug of safe characters, then "--" and a hash of the exact values ("alpha=0.5,beta=1.0--
# 1f0e3c2a"), so no config value reaches a shell or a path as it is written, and two values the slug makes alike
# stay apart. `point_name` builds it; the `distill` rule constrains {point} to this pattern.
POINT_HASH_CHARS = 8
SLUG_VALUE_CHARS = 24  # a string value's characters kept in the slug (the hash tells longer ones apart)
POINT_PATTERN = rf"{re.escape(DEFAULT_POINT)}|[A-Za-z0-9._,=-]+--[0-9a-f]{{{POINT_HASH_CHARS}}}"
_UNSAFE = re.compile(r"[^A-Za-z0-9._-]+")


def point_name(values: dict[str, Any]) -> str:
    """The name of the grid point with `values` ({grid key: value}, in grid order): "key=value,..." with each
    string value's characters outside [A-Za-z0-9._-] as "_", then "--" and the first POINT_HASH_CHARS hex digits
    of the SHA-1 of the values as sorted JSON. Matches POINT_PATTERN."""
    def word(value: Any) -> str:
        text = json.dumps(value) if isinstance(value, bool) or value is None else str(value)
        return _UNSAFE.sub("_", text)[:SLUG_VALUE_CHARS] or "_"

    slug = ",".join(f"{key}={word(value)}" for key, value in values.items())
    digest = hashlib.sha1(json.dumps(values, sort_keys=True).encode()).hexdigest()[:POINT_HASH_CHARS]
    return f"{slug}--{digest}"


@dataclass(frozen=True)
class GridPoint:
    """One point of a method's grid: its name (the `{point}` wildcard, `point_name`: "alpha=0.5,beta=1.0--1f0e3c2a"),
    the grid's values there, and the method's config entry at that point (values in its `weights`)."""

    name: str
    values: dict[str, float]
    settings: dict


def method_grid(name: str, settings: dict | None) -> list[GridPoint]:
    """Every point of config entry `name`'s grid, the first grid key varying slowest; one point
    named DEFAULT_POINT without a grid. A point's settings are the entry without `grid` and `students`, with the
    point's values over the entry's `weights` (a baseline's `params.<name>` keys: over its `params`)."""
    settings = dict(settings or {})
    grid = settings.pop("grid", None) or {}
    settings.pop("students", None)  # which students are distilled with it: planning, not training
    if not grid:
        return [GridPoint(DEFAULT_POINT, {}, settings)]
    points = []
    for combo in itertools.product(*grid.values()):
        values = {key: value if key.startswith(PARAMS) else float(value) for key, value in zip(grid, combo)}
        weights = {**(settings.get("weights") or {}), **{k: v for k, v in values.items() if not k.startswith(PARAMS)}}
        params = {**(settings.get("params") or {}),
                  **{k[len(PARAMS):]: v for k, v in values.items() if k.startswith(PARAMS)}}
        points.append(GridPoint(point_name(values), values, {**settings, "weights": weights}
                                | ({"params": params} if params else {})))
    return points


def grid_point(name: str, settings: dict | None, point: str) -> GridPoint:
    """The point named `point` of entry `name`'s grid (ConfigError naming the points if none)."""
    points = {p.name: p for p in method_grid(name, settings)}
    if point not in points:
        raise ConfigError(f"methods.{name}: no grid point {point!r}; its points: {', '.join(points)}")
    return points[point]


def _weight_is_on(method: Method, key: str) -> bool:
    """Whether loss weight `key` multiplies a term `method` computes."""
    if key in PHASE_OF_WEIGHT:
        return method.uses(PHASE_OF_WEIGHT[key])
    group = key.split(".")[0]
    return method.switches.get(group, True) and method.switches.get(key, True)


def check_method_students(methods: dict[str, dict | None], students: list[str], source: str = "config") -> None:
    """Each `methods.<m>.students` entry names a student of the run (ConfigError naming `source` and the key)."""
    for name, settings in methods.items():
        unknown = [s for s in (settings or {}).get("students", []) if s not in students]
        if unknown:
            raise ConfigError(f"{source}: methods.{name}.students: {', '.join(map(repr, unknown))} not in "
                              f"`students` ({', '.join(students) or 'none'}); list students of the run, or drop the "
                              f"key to distil every student with {name}")


def check_methods(methods: dict[str, dict | None], criterion: str, source: str = "config") -> None:
    """Start-up checks of config["methods"] that the schema cannot express (ConfigError naming `source`
    and the key path): a baseline's settings and grid values are allowed by their declarations
    (`catalog.Setting`), a grid varies only GRID_KEYS and only weights of terms the method computes (else
    its points would train the same model), no method changes BUDGET_KEYS, and the total validation loss
    (`criterion` "val_loss") selects no grid point (each point weighs its terms differently)."""
    try:
        for name, settings in methods.items():
            _check_method(name, settings or {}, criterion)
    except ConfigError as exc:
        raise ConfigError(f"{source}: {exc}") from None


def _check_method(name: str, settings: dict, criterion: str) -> None:
    """`check_methods` of one config entry."""
    method = resolve_method(name, settings)
    grid = settings.get("grid") or {}
    _check_params(name, method, settings.get("params"), {k[len(PARAMS):]: v for k, v in grid.items()
                                                         if k.startswith(PARAMS)})
    for key in grid:
        if key.startswith(PARAMS):
            continue
        if method.baseline is not None:
            raise ConfigError(f"methods.{name}.grid.{key}: {name} is a baseline with its own loss, which "
                              f"distill.weights do not weigh; its grid varies its settings: "
                              f"{', '.join(PARAMS + k for k in method.baseline.defaults)}")
        if key not in GRID_KEYS:
            raise ConfigError(f"methods.{name}.grid: unknown key {key!r}; a grid varies loss weights: "
                              f"{', '.join(GRID_KEYS)}")
        if not _weight_is_on(method, key):
            raise ConfigError(f"methods.{name}.grid.{key}: {name} switches that term off, so every grid "
                              "point would train the same model; drop the key")
    fixed = sorted(set(settings.get("train") or {}) & set(BUDGET_KEYS))
    if fixed:
        raise ConfigError(f"methods.{name}.train.{fixed[0]}: the training budget and optimisation "
                          f"({', '.join(BUDGET_KEYS)}) are the same for every method; set them in distill.train")
    if criterion == "val_loss" and len(method_grid(name, settings)) > 1:
        raise ConfigError(f"methods.{name}.grid: distill.select.criterion 'val_loss' cannot compare grid "
                          "points (each weighs the loss terms differently); use val_cot_loss or val_macro_f1")


def _check_params(name: str, method: Method, params: dict | None, grid: dict[str, list]) -> None:
    """A baseline's `params` and `params.*` grid keys name settings of its recipe, each value allowed by the
    setting's declaration (`catalog.Setting`: type, range, choices); the settings its teacher data depends
    on are fixed per method (the data is made once per method and split). ConfigError naming the key."""
    if method.baseline is None:
        if params or grid:
            raise ConfigError(f"methods.{name}: `params` are the settings of a baseline (unicott, morsd, semcot, "
                              f"cwt); {name} has none")
        return
    spec = method.baseline
    values = [(f"params.{key}", key, value) for key, value in (params or {}).items()]
    values += [(f"grid.{PARAMS}{key}", key, value) for key, listed in grid.items() for value in listed]
    for where, key, value in values:
        if key not in spec.settings:
            raise ConfigError(f"methods.{name}.{where}: unknown setting of {spec.name}; its settings: "
                              f"{', '.join(spec.settings)}")
        problem = spec.settings[key].problem(value)
        if problem is not None:
            raise ConfigError(f"methods.{name}.{where} is {value!r}; {problem}")
    fixed = sorted(set(grid) & set(spec.teacher_data_keys))
    if fixed:
        raise ConfigError(f"methods.{name}.grid.params.{fixed[0]}: the teacher data depends on it, and is made once "
                          f"per method; add a method entry per value instead (base: {spec.name})")
