"""What the anchors and trajectories stages read (`mechdistill.settings`). Torch-free."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from ..settings import Declared, Settings
from ..teacher.settings import GenerationSettings

ANCHOR_KEYS = ("mode", "ancestor_levels", "llm", "near_miss", "early_tokens", "refine_patterns", "min_phase_fraction")
TRAJECTORY_KEYS = ("split", "n_grid", "max_points")


@dataclass(frozen=True)
class AnchorSettings(Settings):
    """anchors: the `anchors` section, the sentence embedder, and the generation settings (mode llm:
    the concept extractor generates with them, max_new_tokens replaced by anchors.llm's)."""

    KEYS = tuple(f"anchors.{k}" for k in ANCHOR_KEYS) + ("embedder",) + GenerationSettings.KEYS

    section: dict[str, Any]
    embedder: str
    generation: GenerationSettings

    @classmethod
    def from_values(cls, values: Declared) -> AnchorSettings:
        return cls(values.section("anchors.", ANCHOR_KEYS), values["embedder"], GenerationSettings.from_values(values))


@dataclass(frozen=True)
class TrajectorySettings(Settings):
    """trajectories: the split, Focus/Confusion grid and prefixes, the early segment (the first
    `early_tokens` tokens of the teacher's tokenizer, for every model's CoT), the teacher's name, the
    embedder. The teacher's models entry is a param of the rule (rules/anchors.smk), so editing it reruns it."""

    KEYS = tuple(f"trajectories.{k}" for k in TRAJECTORY_KEYS) + ("anchors.early_tokens", "teacher", "embedder")

    split: str
    n_grid: int
    max_points: int
    early_tokens: int
    teacher: str
    embedder: str

    @classmethod
    def from_values(cls, values: Declared) -> TrajectorySettings:
        return cls(**values.section("trajectories.", TRAJECTORY_KEYS), early_tokens=values["anchors.early_tokens"],
                   teacher=values["teacher"], embedder=values["embedder"])
