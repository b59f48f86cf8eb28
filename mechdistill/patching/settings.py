"""What the patching stage reads (`mechdistill.settings`), and the check of its bins against the teacher's
head count (at start-up where that count can be read without loading the teacher). Torch-free."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from ..errors import ConfigError
from ..model_sources import ModelCatalog, declared_head_count
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


def check_bins(bins: list[int], head_count: int, teacher: str, source: str) -> None:
    """Every bin of `patching.bins` at most the teacher's heads in total (`head_count`, layers x query heads
    per layer, as its head scores rank them): a larger bin would patch every head, the same set as the bin of
    `head_count`, so its row would repeat another. ConfigError naming the key, the bin and the count."""
    too_large = [b for b in bins if b > head_count]
    if too_large:
        raise ConfigError(f"{source}: patching.bins has {too_large[0]}, but the teacher {teacher} has {head_count} "
                          f"attention heads in total (layers x heads per layer), so that bin would patch the same "
                          f"heads as a bin of {head_count}; give bins of at most {head_count}.")


def check_patching_bins(config: dict, source: str = "config") -> None:
    """`check_bins` at start-up, with the teacher's head count read from its config (`declared_head_count`);
    nothing when that is known only once the model is loaded (the patching job checks it then)."""
    head_count = declared_head_count(ModelCatalog.from_config(config), config["teacher"])
    if head_count is not None:
        check_bins(config["patching"]["bins"], head_count, config["teacher"], source)
