"""What the distillation stages read (`mechdistill.settings`): teacher targets, a baseline's teacher
data, one distill job, the grid-point choice and the students' predictions. Torch-free: the Snakefile
imports it for the rules' params (rules/distill.smk)."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import asdict, dataclass
from typing import Any

from ..characterize.settings import HeadSignals
from ..settings import PLACEMENT_KEYS, Declared, OneKeySettings, Settings
from ..teacher.settings import GenerationSettings

TEACHER_PLACEMENT = tuple(f"distill.teacher_{k}" for k in PLACEMENT_KEYS)


@dataclass(frozen=True)
class TargetSettings(Settings):
    """teacher_targets (run_teacher_targets): top-k logits, the pools, the teacher's dtype, device and
    placement, the document and length caps, the head signals the Phase-1/2 targets reuse, the documents
    per resumable shard and the documents in flight on the teacher."""

    KEYS = ("distill.top_k", "distill.pools", "distill.teacher_dtype", "distill.max_docs", "distill.max_tokens",
            "distill.train.device") + TEACHER_PLACEMENT + HeadSignals.KEYS + ("distill.teacher_shard_size",
                                                                              "distill.teacher_in_flight")

    top_k: int
    pools: dict[str, Any]
    teacher_dtype: str
    max_docs: int | None
    max_tokens: int | None
    device: str | None
    placement: dict[str, Any]
    signals: HeadSignals
    shard_size: int  # documents per resumable shard of teacher_targets
    in_flight: int  # documents at once on the teacher (inflight.in_flight)

    @classmethod
    def from_values(cls, values: Declared) -> TargetSettings:
        return cls(values["distill.top_k"], values["distill.pools"], values["distill.teacher_dtype"],
                   values["distill.max_docs"], values["distill.max_tokens"], values["distill.train.device"],
                   values.section("distill.teacher_", PLACEMENT_KEYS), HeadSignals.from_values(values),
                   values["distill.teacher_shard_size"], values["distill.teacher_in_flight"])

    def shard_key(self) -> dict[str, Any]:
        """The settings that change what teacher_targets computes (its shards' key): not where the teacher
        runs (device, placement) nor how many documents are in flight, which change no target."""
        return {"top_k": self.top_k, "pools": self.pools, "teacher_dtype": self.teacher_dtype,
                "max_docs": self.max_docs, "max_tokens": self.max_tokens, "signals": asdict(self.signals),
                "shard_size": self.shard_size}


@dataclass(frozen=True)
class DistillSettings(Settings):
    """distill (run_distill): the whole `distill` section (training, losses, pools, selection, the
    online teacher), the `heads` section (the signals, and the run's resume key), the seed, and the
    generation settings (val_macro_f1 generates with the student as student_predict does). The
    method's settings at the job's grid point are a param of their own (rules/distill.smk).
    `targets`: what teacher_targets reads, from the same two sections (the online teacher's)."""

    KEYS = ("distill", "heads") + GenerationSettings.KEYS

    distill: dict[str, Any]
    heads: dict[str, Any]
    targets: TargetSettings
    generation: GenerationSettings

    @classmethod
    def params(cls, config: Mapping[str, Any], **names: Any) -> str:
        """As `Settings.params`, without distill.train.report_to: streaming the train log (TensorBoard, W&B)
        changes no output, so turning the curves on or off retrains nothing."""
        train = {key: value for key, value in config["distill"]["train"].items() if key != "report_to"}
        return super().params({**config, "distill": {**config["distill"], "train": train}}, **names)

    @classmethod
    def from_values(cls, values: Declared) -> DistillSettings:
        sections = {"distill": values["distill"], "heads": values["heads"]}
        return cls(values["distill"], values["heads"], TargetSettings.from_config(sections),
                   GenerationSettings.from_values(values))

    @property
    def signals(self) -> HeadSignals:
        return self.targets.signals

    @property
    def criterion(self) -> str:
        """distill.select.criterion: what the best evaluation (and the grid point) is chosen by."""
        return self.distill["select"]["criterion"]

    @property
    def val_docs(self) -> int | None:
        """distill.select.val_docs: the val documents val_macro_f1 answers (the first; None: all)."""
        return self.distill["select"].get("val_docs")

    @property
    def seed(self) -> int:
        return self.generation.seed


@dataclass(frozen=True)
class BaselineDataSettings(Settings):
    """baseline_teacher_data: the generation settings and the document cap. The method's teacher-data
    settings are a param of their own (rules/distill.smk)."""

    KEYS = GenerationSettings.KEYS + ("distill.max_docs",)

    generation: GenerationSettings
    max_docs: int | None

    @classmethod
    def from_values(cls, values: Declared) -> BaselineDataSettings:
        return cls(GenerationSettings.from_values(values), values["distill.max_docs"])


class SelectSettings(OneKeySettings):
    """select_distill: the criterion a grid point is chosen by."""

    KEYS = ("distill.select.criterion",)


@dataclass(frozen=True)
class StudentPredictSettings(Settings):
    """student_predict: the generation settings (generation.student_backend's engine) and the method's
    entry (a baseline with its own inference reads its settings at the chosen grid point)."""

    KEYS = GenerationSettings.KEYS + ("methods.{method}",)

    generation: GenerationSettings
    method: dict[str, Any] | None

    @classmethod
    def from_values(cls, values: Declared) -> StudentPredictSettings:
        return cls(GenerationSettings.from_values(values), values["methods.{method}"])


@dataclass(frozen=True)
class CardSettings(Settings):
    """A published student's model card (select_distill writes it, model_card adds the test metrics): the
    teacher, the models' specs (the teacher's and the student's), the method's entry and the loss weights
    it trained with (distill.weights; the entry's own weights go over them)."""

    KEYS = ("teacher", "models", "methods.{method}", "distill.weights")

    teacher: str
    models: dict[str, Any]
    method: dict[str, Any] | None
    weights: dict[str, Any]

    @classmethod
    def from_values(cls, values: Declared) -> CardSettings:
        return cls(values["teacher"], values["models"], values["methods.{method}"], values["distill.weights"] or {})
