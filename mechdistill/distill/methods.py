"""Distillation methods: which loss terms are on (the `{method}` wildcard values).

A method is a named set of switches over the terms of `losses.total_loss` (groups "cot",
"phase1", "phase2"; terms "phase1.attn", "phase1.write", "phase1.interaction", "phase2.qk",
"phase2.ov", "phase2.interaction", "cot.ce", "cot.kl"). `config["methods"]` maps a method name
to settings; the name is looked up here unless the settings give `base:`:

    methods:
      vanilla: {}                          # CoT loss only
      mech: {alpha: 1.0, beta: 1.0}        # the paper's method
      mech_strong: {base: mech, alpha: 5.0, train: {lr: 1e-4}}

Further methods (UniCoTT, MoRSD, SemCoT, CWT) register here with `register_method`; one that
needs a different objective than switches over these terms can give its own `loss` factory.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field


@dataclass(frozen=True)
class Method:
    name: str
    switches: dict[str, bool] = field(default_factory=dict)
    description: str = ""
    loss: Callable | None = None  # custom loss factory (None: switches over losses.total_loss)

    def uses(self, phase: str) -> bool:
        """Whether any term of `phase` ("phase1" / "phase2") is on."""
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
    Method("vanilla", {"phase1": False, "phase2": False}, "CoT loss only (CE + KL to the teacher's top-k)"),
    Method("mech", {}, "CoT + Phase 1 + Phase 2 losses"),
    Method("phase1_only", {"phase2": False}, "CoT + Phase 1 losses"),
    Method("phase2_only", {"phase1": False}, "CoT + Phase 2 losses"),
    Method("no_p1_attn", {"phase1.attn": False}, "mech without the Phase 1 attention KL"),
    Method("no_p1_write", {"phase1.write": False}, "mech without the Phase 1 write alignment"),
    Method("no_p1_interaction", {"phase1.interaction": False}, "mech without the Phase 1 interaction term"),
    Method("no_p2_qk", {"phase2.qk": False}, "mech without the Phase 2 QK loop-back term"),
    Method("no_p2_ov", {"phase2.ov": False}, "mech without the Phase 2 OV helpfulness term"),
    Method("no_p2_interaction", {"phase2.interaction": False}, "mech without the Phase 2 interaction term"),
]:
    register_method(_m)


def resolve_method(name: str, settings: dict | None) -> Method:
    """The registered method behind config entry `name` (settings may name a `base`), with the
    entry's extra `switches` applied."""
    settings = settings or {}
    base = settings.get("base", name)
    if base not in METHODS:
        raise KeyError(f"methods.{name}: unknown method {base!r}; registered: {sorted(METHODS)} "
                       f"(give `base:` to name one of them)")
    method = METHODS[base]
    extra = settings.get("switches") or {}
    return Method(name, {**method.switches, **extra}, method.description, method.loss) if (extra or base != name) \
        else method
