"""What the evaluate, tables, figure9 and claims stages read (`mechdistill.settings`). Torch-free."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from ..characterize.settings import HeadSignals
from ..paths import distilled_pairs
from ..settings import PLACEMENT_KEYS, Declared, Settings

EVALUATE_KEYS = ("ks", "propensity", "las", "n_bootstrap", "device", "dtype", "in_flight") + PLACEMENT_KEYS
RUN_KEYS = ("datasets", "students", "methods", "teacher", "evaluate.n_bootstrap", "seed")


@dataclass(frozen=True)
class EvaluateSettings(Settings):
    """evaluate: the `evaluate` section, the mechanism metrics' pools, length cap and head signals,
    the seed (bootstrap, LAS simulator) and the embedder (LAS encoders)."""

    KEYS = tuple(f"evaluate.{k}" for k in EVALUATE_KEYS) + HeadSignals.KEYS + (
        "distill.pools", "distill.max_tokens", "seed", "embedder")

    section: dict[str, Any]
    signals: HeadSignals
    pools: dict[str, Any]
    max_tokens: int | None
    seed: int
    embedder: str

    @classmethod
    def from_values(cls, values: Declared) -> EvaluateSettings:
        return cls(values.section("evaluate.", EVALUATE_KEYS), HeadSignals.from_values(values),
                   values["distill.pools"], values["distill.max_tokens"], values["seed"], values["embedder"])

    @property
    def placement(self) -> dict[str, Any]:
        return {k: self.section[k] for k in PLACEMENT_KEYS}

    @property
    def in_flight(self) -> int:
        """Documents whose forwards run at once on the model (`inflight.in_flight`)."""
        return int(self.section["in_flight"])


@dataclass(frozen=True)
class LasSimulatorSettings(Settings):
    """las_simulator: the LAS simulators (`evaluate.las`: kind, target, target form, seq2seq training),
    the seed (seq2seq training) and the embedder (the embedding kinds' encoder)."""

    KEYS = ("evaluate.las", "seed", "embedder")

    las: dict[str, Any]
    seed: int
    embedder: str

    @classmethod
    def from_values(cls, values: Declared) -> LasSimulatorSettings:
        return cls(values["evaluate.las"], values["seed"], values["embedder"])


@dataclass(frozen=True)
class RunSettings(Settings):
    """tables and figure9: which datasets, students, methods (their kinds) and teacher the run has,
    and the bootstrap of their CIs."""

    KEYS = RUN_KEYS

    datasets: dict[str, Any]
    students: list[str]
    methods: dict[str, Any]
    teacher: str
    n_bootstrap: int
    seed: int

    @classmethod
    def from_values(cls, values: Declared) -> RunSettings:
        return cls(values["datasets"], values["students"], values["methods"], values["teacher"],
                   values["evaluate.n_bootstrap"], values["seed"])

    @property
    def pairs(self) -> list[tuple[str, str]]:
        """The (student, method) pairs the run distils (`paths.distilled_pairs`)."""
        return distilled_pairs({"students": self.students, "methods": self.methods})


@dataclass(frozen=True)
class ClaimSettings(Settings):
    """claims: the run (`RunSettings`), patching's gap and bootstrap, and each phase's pool size."""

    KEYS = RUN_KEYS + ("patching.min_gap", "patching.n_bootstrap", "distill.pools.phase1.k", "distill.pools.phase2.k")

    run: RunSettings
    min_gap: float
    patching_bootstrap: int
    pool_sizes: dict[str, int]

    @classmethod
    def from_values(cls, values: Declared) -> ClaimSettings:
        return cls(RunSettings.from_values(values), values["patching.min_gap"], values["patching.n_bootstrap"],
                   {phase: values[f"distill.pools.{phase}.k"] for phase in ("phase1", "phase2")})
