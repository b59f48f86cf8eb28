"""What the prompt and generation stages read (`mechdistill.settings`): the task prompts, the
candidate lists, the clean-prompt set and the generation settings. Torch-free: the Snakefile imports
it for the rules' params."""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any

from ..settings import Declared, Settings

PROMPT_KEYS = ("exemplar", "exemplar_style", "system", "instruction")
CLEAN_PROMPT_KEYS = ("source_split", "n_docs", "n_labels", "n_near_miss", "snippet_sentences", "snippet_chars")
GENERATION_KEYS = ("backend", "max_new_tokens", "batch_size", "temperature", "repetition_penalty", "shard_size",
                   "dtype", "student_backend", "device", "tensor_parallel_size", "gpu_memory_utilization",
                   "max_model_len", "enforce_eager", "kv_cache_gib", "in_process", "traces", "force_answer_tokens",
                   "fuzzy_threshold")


@dataclass(frozen=True)
class PromptSettings(Settings):
    """The task prompts' text: the one-shot exemplar switch and its worked answer's style
    (`prompts.exemplar_answer`), the system message and the instruction."""

    KEYS = tuple(f"prompts.{k}" for k in PROMPT_KEYS)

    exemplar: bool
    exemplar_style: str
    system: str
    instruction: str

    @classmethod
    def from_values(cls, values: Declared) -> PromptSettings:
        return cls(**values.section("prompts.", PROMPT_KEYS))

    def mapping(self) -> dict[str, Any]:
        """As the prompt builders take them: {exemplar, exemplar_style, system, instruction}."""
        return asdict(self)


@dataclass(frozen=True)
class CandidateSettings(Settings):
    """build_prompts: a dataset's candidate lists, the task prompts, the seed and the embedder (retrieval)."""

    KEYS = ("datasets.{dataset}.candidates", "seed", "embedder") + PromptSettings.KEYS

    candidates: dict[str, Any]
    prompts: PromptSettings
    seed: int
    embedder: str

    @classmethod
    def from_values(cls, values: Declared) -> CandidateSettings:
        return cls(values["datasets.{dataset}.candidates"], PromptSettings.from_values(values), values["seed"],
                   values["embedder"])


@dataclass(frozen=True)
class CleanPromptSettings(Settings):
    """clean_prompts: the characterization set's size and snippets, the seed and the embedder. The
    style comes from the split's name; its text is fixed in `clean_prompts` (the guided styles do not
    read the task prompts, so a neutral task prompt leaves the guided comparison guided)."""

    KEYS = tuple(f"clean_prompts.{k}" for k in CLEAN_PROMPT_KEYS) + ("seed", "embedder")

    section: dict[str, Any]
    seed: int
    embedder: str

    @classmethod
    def from_values(cls, values: Declared) -> CleanPromptSettings:
        return cls(values.section("clean_prompts.", CLEAN_PROMPT_KEYS), values["seed"], values["embedder"])


@dataclass(frozen=True)
class GenerationSettings(Settings):
    """How text is generated (teacher CoT, the students' predictions, a baseline's teacher data); the
    seed seeds vLLM's sampling. `backend` / `student_backend` "auto" are resolved once at start-up
    (`engines.resolve_engines`), so the rules and the jobs see what runs."""

    KEYS = tuple(f"generation.{k}" for k in GENERATION_KEYS) + ("seed",)

    backend: str
    max_new_tokens: int
    batch_size: int
    temperature: float
    repetition_penalty: float
    shard_size: int
    dtype: str
    student_backend: str
    device: str
    tensor_parallel_size: int
    gpu_memory_utilization: float
    max_model_len: int | None
    enforce_eager: bool | None
    kv_cache_gib: float
    in_process: bool | None
    traces: str | None
    force_answer_tokens: int
    fuzzy_threshold: float
    seed: int

    @classmethod
    def from_values(cls, values: Declared) -> GenerationSettings:
        return cls(**values.section("generation.", GENERATION_KEYS), seed=values["seed"])

    def mapping(self) -> dict[str, Any]:
        """The generation section as the backends take it (the keys of `generation`, no seed)."""
        return {k: v for k, v in asdict(self).items() if k != "seed"}
