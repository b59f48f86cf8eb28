"""What prepare_dataset reads (`mechdistill.settings`): one dataset's entry and the seed. Torch-free."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from ..settings import Declared, Settings


@dataclass(frozen=True)
class DatasetSettings(Settings):
    """A dataset's adapter, its arguments and per-split caps (not its candidate lists: build_prompts'),
    and the seed of the subsample."""

    KEYS = ("datasets.{dataset}.adapter", "datasets.{dataset}.params", "datasets.{dataset}.max_docs", "seed")

    adapter: str
    arguments: dict[str, Any]
    max_docs: dict[str, int]
    seed: int

    @classmethod
    def from_values(cls, values: Declared) -> DatasetSettings:
        return cls(values["datasets.{dataset}.adapter"], values["datasets.{dataset}.params"] or {},
                   values["datasets.{dataset}.max_docs"] or {}, values["seed"])
