"""What the patching stage reads (`mechdistill.settings`). Torch-free."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from ..settings import PLACEMENT_KEYS, Declared, Settings

PATCHING_KEYS = ("split", "max_docs", "max_tokens", "bins", "n_random", "early_tokens", "late_tokens", "batch_size",
                 "phase1_corruption", "peak_terms", "pad", "value_swaps", "min_gap", "n_bootstrap", "device",
                 "dtype", "in_flight") + PLACEMENT_KEYS


@dataclass(frozen=True)
class PatchingSettings(Settings):
    """patching: the `patching` section (its early_tokens defaulting to anchors.early_tokens), the
    teacher's repetition penalty, the embedder (the Confusion metric) and the seed."""

    KEYS = tuple(f"patching.{k}" for k in PATCHING_KEYS) + ("anchors.early_tokens", "generation.repetition_penalty",
                                                             "embedder", "seed", "clean_prompts.style")

    section: dict[str, Any]
    early_tokens: int
    repetition_penalty: float
    embedder: str
    seed: int
    clean_style: str

    @classmethod
    def from_values(cls, values: Declared) -> PatchingSettings:
        return cls(values.section("patching.", PATCHING_KEYS),
                   values["patching.early_tokens"] or values["anchors.early_tokens"],
                   values["generation.repetition_penalty"], values["embedder"], values["seed"],
                   values["clean_prompts.style"])

    @property
    def in_flight(self) -> int:
        """Documents patched at once on the model (`inflight.in_flight`)."""
        return int(self.section["in_flight"])

    @property
    def placement(self) -> dict[str, Any]:
        return {k: self.section[k] for k in PLACEMENT_KEYS}
