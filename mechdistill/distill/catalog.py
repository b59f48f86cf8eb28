"""The four baselines as the workflow sees them before it trains one: names, settings, teacher needs.

Everything here is plain Python (no torch), so `snakemake` parsing the DAG, `mechdistill
validate-config` and `--help` stay instant; the recipe itself (`<name>.RECIPE`: items, loss,
teacher data, inference; `methods.Method.load_recipe`) is imported only by the jobs that train,
build teacher data or predict:

    BASELINES["morsd"].defaults          # its settings, overridden by methods.<entry>.params
    BASELINES["morsd"].teacher_data_keys # those the teacher data depends on (not griddable)
    BASELINES["morsd"].teacher_calls(p)  # (teacher calls per document, new tokens per call) with settings p:
                                         # (0, 0) needs no baseline_teacher_data job; `mechdistill plan` prices it

Each setting is declared once, here, as a `Setting`: its default, its type and allowed range or
choices, and its meaning. `Setting.problem` checks a value against it; `methods.check_methods` runs it
over every method's `params:` and `grid:` values when the workflow starts. The meanings say where a
value comes from: "paper" / "original" when checked against the method's paper or code, "not checked"
when chosen here (docs/baselines.md).
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

SETTING_TYPES = {"int": "an integer", "number": "a number", "str": "a string", "bool": "true or false"}


@dataclass(frozen=True)
class Setting:
    """One setting of a method: its default, its type ("int", "number", "str" or "bool"; an integer is
    also a number, a bool is neither), its range (`minimum` / `maximum` inclusive, `above`: strictly
    greater), the strings it may take (`choices`, besides a value of its type where that is not "str"),
    whether null is allowed (`nullable`: None means the teacher's generation setting), and its meaning."""

    default: Any
    type: str
    meaning: str
    minimum: float | None = None
    maximum: float | None = None
    above: float | None = None
    choices: tuple[str, ...] = ()
    nullable: bool = False

    def __post_init__(self) -> None:
        if self.type not in SETTING_TYPES:
            raise ValueError(f"setting type must be one of {sorted(SETTING_TYPES)}, got {self.type!r}")
        if self.problem(self.default) is not None:
            raise ValueError(f"default {self.default!r}: {self.problem(self.default)}")

    def allowed(self) -> str:
        """What the setting accepts, in words: "an integer >= 1", "'lowest' or 'highest'", ..."""
        if self.type == "str" and self.choices:
            words = " or ".join(repr(c) for c in self.choices)
        else:
            bounds = [f">= {self.minimum:g}" if self.minimum is not None else "",
                      f"> {self.above:g}" if self.above is not None else "",
                      f"<= {self.maximum:g}" if self.maximum is not None else ""]
            words = " ".join([SETTING_TYPES[self.type], " and ".join(b for b in bounds if b)]).strip()
            words += "".join(f" or {c!r}" for c in self.choices)
        return words + (" or null" if self.nullable else "")

    def problem(self, value: Any) -> str | None:
        """None when `value` is allowed, else what is wrong with it (for a ConfigError naming the key)."""
        if value is None and self.nullable or value in self.choices and isinstance(value, str):
            return None
        is_number = isinstance(value, (int, float)) and not isinstance(value, bool)
        typed = {"int": isinstance(value, int) and not isinstance(value, bool), "number": is_number,
                 "str": isinstance(value, str) and not self.choices, "bool": isinstance(value, bool)}[self.type]
        in_range = not is_number or ((self.minimum is None or value >= self.minimum)
                                     and (self.maximum is None or value <= self.maximum)
                                     and (self.above is None or value > self.above))
        return None if typed and in_range else f"allowed: {self.allowed()}. The setting: {self.meaning}."


@dataclass(frozen=True)
class Baseline:
    """A baseline's name, one-line description and settings. `teacher_data` / `own_inference`: whether
    its recipe builds extra teacher data / answers through its own `predict` (checked against the
    recipe when it is imported); `teacher_calls(params)`: the teacher generations per document and the
    most new tokens of each with those settings (a recipe with teacher data may build it without the
    teacher, e.g. UniCoTT's chain: (0, 0))."""

    name: str
    description: str
    settings: Mapping[str, Setting] = field(default_factory=dict)
    teacher_data_keys: tuple[str, ...] = ()
    teacher_data: bool = False
    own_inference: bool = False
    teacher_calls: Callable[[Mapping[str, Any]], tuple[int, int]] = lambda params: (0, 0)
    generation_keys: tuple[str, ...] = ()  # settings whose value None means the teacher's generation.<key>

    @property
    def defaults(self) -> dict[str, Any]:
        """Every setting's default: {name: value}."""
        return {key: setting.default for key, setting in self.settings.items()}

    def asks_teacher(self, params: Mapping[str, Any]) -> bool:
        """Whether settings `params` call the teacher (a baseline_teacher_data job)."""
        return self.teacher_data and self.teacher_calls(params)[0] > 0

    def params(self, overrides: Mapping[str, Any] | None, generation: Mapping[str, Any] | None = None) -> dict[str, Any]:
        """The defaults with the config's overrides; an unknown key is an error naming the known ones. A
        `generation_keys` setting left None takes generation[key] (the config's `generation` section, the
        teacher's own greedy budget) when `generation` is given."""
        unknown = sorted(set(overrides or {}) - set(self.defaults))
        if unknown:
            raise KeyError(f"{self.name}: unknown setting {unknown[0]!r}; its settings: {', '.join(self.defaults)}")
        params = {**self.defaults, **(overrides or {})}
        for key in self.generation_keys:
            if params[key] is None and generation is not None:
                params[key] = generation[key]
        return params


BASELINES: dict[str, Baseline] = {b.name: b for b in (
    Baseline(
        "unicott", "UniCoTT: structured explanations, node contrastive + structural-consistency losses",
        settings={
            "structure": Setting("chain", "str", "the explanation's structure (paper: tree; chain and graph also "
                                 "studied)", choices=("chain", "tree", "graph")),
            "max_nodes": Setting(7, "int", "chain steps at most; tree and graph have 7 nodes (paper's tree: 7)",
                                 minimum=1),
            "node_max_tokens": Setting(48, "int", "teacher tokens per tree / graph node (not given in the paper)",
                                       minimum=1),
            "w_con": Setting(0.5, "number", "weight of the node contrastive loss (paper: 0.5)", minimum=0),
            "w_struct": Setting(0.2, "number", "weight of the structural-consistency loss (paper: 0.2)", minimum=0),
            "temperature": Setting(0.1, "number", "SupCon temperature (not checked)", above=0),
            "var_target": Setting(1.0, "number", "VICReg gamma (not checked)", minimum=0),
            "n_negatives": Setting(2, "int", "other documents whose nodes are contrasted (paper: the batch)",
                                   minimum=0),
        },
        teacher_data_keys=("structure", "max_nodes", "node_max_tokens"), teacher_data=True,
        teacher_calls=lambda p: (0, 0) if p["structure"] == "chain" else (7, p["node_max_tokens"])),  # 7 nodes
    Baseline(
        "morsd", "MoRSD: sampled teacher rationales selected by the student's Rationale Difficulty",
        settings={
            "n_samples": Setting(2, "int", "sampled rationales per document (paper: not checked)", minimum=1),
            "temperature": Setting(0.7, "number", "sampling temperature (paper: not checked)", above=0),
            "max_new_tokens": Setting(None, "int", "new tokens per sample; null: generation.max_new_tokens, the "
                                      "greedy traces' budget (paper: the teacher's own)", minimum=1, nullable=True),
            "force_answer_tokens": Setting(None, "int", "a sample without an answer block gets \"\\n<answer>\" and "
                                           "this many tokens; null: generation.force_answer_tokens, as the greedy "
                                           "traces", minimum=0, nullable=True),
            "min_f1": Setting("greedy", "number", "\"greedy\": a rationale is correct when its answer F1 > 0 and >= "
                              "the greedy trace's F1; a number: F1 >= it (paper: exact answer, 1.0); docs/baselines.md",
                              minimum=0, maximum=1, choices=("greedy",)),
            "dedup_threshold": Setting(0.9, "number", "word-set Jaccard above which a rationale is a near-duplicate "
                                       "(not checked)", minimum=0, maximum=1),
            "n_select": Setting(1, "int", "rationales kept per document (paper: not checked)", minimum=1),
            "rd_keep": Setting("lowest", "str", "which rationale difficulty is kept first (paper: not checked)",
                               choices=("lowest", "highest")),
        },
        teacher_data_keys=("n_samples", "temperature", "max_new_tokens", "force_answer_tokens"), teacher_data=True,
        generation_keys=("max_new_tokens", "force_answer_tokens"),
        # tokens per call: 0 while the budget is unresolved (params without `generation`: only the calls are read)
        teacher_calls=lambda p: (p["n_samples"], (p["max_new_tokens"] or 0) + (p["force_answer_tokens"] or 0))),
    Baseline(
        "semcot", "SemCoT: implicit thought tokens aligned with the reasoning, answered from them",
        settings={
            "K": Setting(5, "int", "implicit thought states (original: 5 in training, 1 at evaluation)", minimum=1),
            "placeholder": Setting("...", "str", "the placeholder token's text (original: a new \"<thought>\" "
                                   "token)"),
            "implicit_norm": Setting("embed", "str", "rescaling of the thought states (original: a learned linear "
                                     "projection)", choices=("embed", "none")),
            "alpha": Setting(0.5, "number", "align weight; original: tuned per dataset, 0.25-0.75", minimum=0),
            "contrastive_weight": Setting(0.1, "number", "contrastive weight (original: a separate encoder "
                                          "pre-training stage)", minimum=0),
            "n_negatives": Setting(3, "int", "negatives per document (original: in-batch negatives, batch size 4)",
                                   minimum=0),
            "tau": Setting(1.0, "number", "InfoNCE temperature (original: 1, no temperature)", above=0),
            "max_reason_tokens": Setting(256, "int", "reasoning tokens encoded at most (original: max_seq_len 512)",
                                         minimum=1),
            "condense": Setting("teacher", "str", "who condenses the reasoning (original: GPT-4o-mini)",
                                choices=("teacher", "heuristic")),
            "condense_max_new_tokens": Setting(48, "int", "the teacher's new tokens per condensation", minimum=1),
            "condense_words": Setting(24, "int", "words of a condensation (original: \"within 10 words\")",
                                      minimum=1),
            "max_answer_tokens": Setting(32, "int", "answer tokens when generation has no force_answer_tokens "
                                         "(original: 30)", minimum=1),
        },
        teacher_data_keys=("condense", "condense_max_new_tokens", "condense_words"), teacher_data=True,
        own_inference=True,
        teacher_calls=lambda p: (0, 0) if p["condense"] == "heuristic" else (1, p["condense_max_new_tokens"])),
    Baseline(
        "cwt", "CWT: chunk-wise CoT supervision, then learning to skip chunks",
        settings={
            "n_chunks": Setting(4, "int", "chunks per rationale (paper: not checked)", minimum=1),
            "chunking": Setting("search", "str", "average chunking (AC) or search-based chunking (SBC, the paper's "
                                "main variant)", choices=("average", "search")),
            "snap_window": Setting(0.3, "number", "average chunks a boundary may move to a sentence start (ours)",
                                   minimum=0),
            "search_window": Setting(0.5, "number", "average chunks a boundary may move in the search (paper: not "
                                     "checked)", minimum=0),
            "skip_from_epoch": Setting(1, "int", "0-based epoch skip-thinking training starts (paper: not checked)",
                                       minimum=0),
            "skip_tolerance": Setting(0.05, "number", "rise of the answer CE, in nats per answer token, up to which "
                                      "a chunk is skippable (paper: not checked)"),
        }),
)}
