"""What the characterization stages read (`mechdistill.settings`): the head-scoring variant shared with
the Phase-1/2 signals of distillation and evaluation, and the head_scores / figures / comparison jobs.
Torch-free: the Snakefile imports it for the rules' params."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from ..settings import PLACEMENT_KEYS, Declared, OneKeySettings, Settings

KEY_SETS = ("all", "document")
SHARPNESS_KINDS = ("kurtosis", "normalized")
REFINE_RANKINGS = ("product", "both_positive")


@dataclass(frozen=True)
class CoarseVariant:
    """Which CoarseScore ranks the heads and shapes the Phase-1 signals (config `heads.coarse`):
    keys "all" (every causal key, the paper as written) or "document" (the keys of the final user
    message's document and candidate list only: no BOS, chat template, instruction, exemplar or
    CoT); sharpness "kurtosis" or "normalized" (`scores.sharpness`)."""

    keys: str = "document"
    sharpness: str = "normalized"

    def __post_init__(self) -> None:
        if self.keys not in KEY_SETS or self.sharpness not in SHARPNESS_KINDS:
            raise ValueError(f"CoarseVariant: keys in {KEY_SETS}, sharpness in {SHARPNESS_KINDS}; "
                             f"got {self.keys!r}, {self.sharpness!r}")

    @property
    def name(self) -> str:
        """Its column in the coarse head table, e.g. coarse_document_normalized."""
        return f"coarse_{self.keys}_{self.sharpness}"

    @property
    def sharpness_name(self) -> str:
        """The column of its sharpness factor, e.g. sharpness_document_normalized."""
        return f"sharpness_{self.keys}_{self.sharpness}"


@dataclass(frozen=True)
class HeadSignals(Settings):
    """The quantities that ranked the heads, which the Phase-1/2 signals of teacher targets,
    distillation and the mechanism metrics reuse: OV helpfulness's tau (Eq. 3), the CoarseScore
    variant (built once here) and the RefineScore ranking."""

    KEYS = ("heads.tau", "heads.coarse", "heads.refine")

    tau: float
    coarse: CoarseVariant
    refine_ranking: str

    @classmethod
    def from_values(cls, values: Declared) -> HeadSignals:
        return cls(values["heads.tau"], CoarseVariant(**values["heads.coarse"]), values["heads.refine"]["ranking"])


@dataclass(frozen=True)
class HeadSettings(Settings):
    """head_scores (and style_head_scores): which split (clean_prompts.style: the clean set's), how
    many documents and tokens, the signals, Fig. 7's stages, where the scored model runs and how many
    documents are scored on it at once (in_flight)."""

    KEYS = HeadSignals.KEYS + ("heads.split", "heads.max_docs", "heads.max_tokens", "heads.n_stages",
                               "heads.device", "heads.dtype", "heads.in_flight") + tuple(
        f"heads.{k}" for k in PLACEMENT_KEYS) + ("clean_prompts.style",)

    signals: HeadSignals
    split: str
    max_docs: int | None
    max_tokens: int | None
    n_stages: int
    device: str
    dtype: str
    in_flight: int
    placement: dict[str, Any]
    clean_style: str

    @classmethod
    def from_values(cls, values: Declared) -> HeadSettings:
        return cls(HeadSignals.from_values(values), values["heads.split"], values["heads.max_docs"],
                   values["heads.max_tokens"], values["heads.n_stages"], values["heads.device"],
                   values["heads.dtype"], values["heads.in_flight"], values.section("heads.", PLACEMENT_KEYS),
                   values["clean_prompts.style"])


class HeadFigureSettings(OneKeySettings):
    """head_figures: how many top heads Figs. 4 and 7 label."""

    KEYS = ("heads.top_k",)


class HeadComparisonSettings(OneKeySettings):
    """head_comparison: top heads per variant in heads/comparison.md."""

    KEYS = ("heads.compare_top_k",)
