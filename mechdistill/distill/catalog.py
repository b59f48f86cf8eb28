"""The four baselines as the workflow sees them before it trains one: names, settings, teacher needs.

Everything here is plain Python (no torch), so `snakemake` parsing the DAG, `mechdistill
validate-config` and `--help` stay instant; the recipe itself (`<name>.RECIPE`: items, loss,
teacher data, inference; `methods.Method.load_recipe`) is imported only by the jobs that train,
build teacher data or predict:

    BASELINES["morsd"].defaults          # its settings, overridden by methods.<entry>.params
    BASELINES["morsd"].teacher_data_keys # those the teacher data depends on (not griddable)
    BASELINES["morsd"].teacher_calls(p)  # (teacher calls per document, new tokens per call) with settings p:
                                         # (0, 0) needs no baseline_teacher_data job; `mechdistill plan` prices it

The setting comments say where a value comes from: "paper" / "original" when checked against the
method's paper or code, "not checked" when chosen here (docs/baselines.md).
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any


@dataclass(frozen=True)
class Baseline:
    """A baseline's name, one-line description and settings. `teacher_data` / `own_inference`: whether
    its recipe builds extra teacher data / answers through its own `predict` (checked against the
    recipe when it is imported); `teacher_calls(params)`: the teacher generations per document and the
    most new tokens of each with those settings (a recipe with teacher data may build it without the
    teacher, e.g. UniCoTT's chain: (0, 0))."""

    name: str
    description: str
    defaults: Mapping[str, Any]
    teacher_data_keys: tuple[str, ...] = ()
    teacher_data: bool = False
    own_inference: bool = False
    teacher_calls: Callable[[Mapping[str, Any]], tuple[int, int]] = lambda params: (0, 0)
    generation_keys: tuple[str, ...] = ()  # settings whose value None means the teacher's generation.<key>

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
        defaults={
            "structure": "chain",     # paper: tree (chain and graph also studied)
            "max_nodes": 7,           # chain steps at most; tree and graph have 7 nodes (paper's tree: 7)
            "node_max_tokens": 48,    # teacher tokens per tree / graph node (not given in the paper)
            "w_con": 0.5,             # paper: 0.5
            "w_struct": 0.2,          # paper: 0.2
            "temperature": 0.1,       # SupCon temperature (not checked)
            "var_target": 1.0,        # VICReg gamma (not checked)
            "n_negatives": 2,         # other documents whose nodes are contrasted (paper: the batch)
        },
        teacher_data_keys=("structure", "max_nodes", "node_max_tokens"), teacher_data=True,
        teacher_calls=lambda p: (0, 0) if p["structure"] == "chain" else (7, p["node_max_tokens"])),  # 7 nodes
    Baseline(
        "morsd", "MoRSD: sampled teacher rationales selected by the student's Rationale Difficulty",
        defaults={
            "n_samples": 2,           # sampled rationales per document (paper: not checked)
            "temperature": 0.7,       # sampling temperature (paper: not checked)
            "max_new_tokens": None,   # None: generation.max_new_tokens, the greedy traces' budget (paper: the teacher's own)
            "force_answer_tokens": None,  # a sample without an answer block gets "\n<answer>" and this many
                                      # tokens; None: generation.force_answer_tokens, as the greedy traces
            "min_f1": "greedy",       # "greedy": a rationale is correct when its answer F1 > 0 and >= the greedy
                                      # trace's F1; a number: F1 >= it (paper: exact answer, 1.0); docs/baselines.md
            "dedup_threshold": 0.9,   # word-set Jaccard above which a rationale is a near-duplicate (not checked)
            "n_select": 1,            # rationales kept per document (paper: not checked)
            "rd_keep": "lowest",      # "lowest" | "highest" RD first (paper: not checked)
        },
        teacher_data_keys=("n_samples", "temperature", "max_new_tokens", "force_answer_tokens"), teacher_data=True,
        generation_keys=("max_new_tokens", "force_answer_tokens"),
        # tokens per call: 0 while the budget is unresolved (params without `generation`: only the calls are read)
        teacher_calls=lambda p: (p["n_samples"], (p["max_new_tokens"] or 0) + (p["force_answer_tokens"] or 0))),
    Baseline(
        "semcot", "SemCoT: implicit thought tokens aligned with the reasoning, answered from them",
        defaults={
            "K": 5,                          # implicit thought states (original: 5 in training, 1 at evaluation)
            "placeholder": "...",            # original: a new "<thought>" token
            "implicit_norm": "embed",        # "embed" | "none" (original: a learned linear projection)
            "alpha": 0.5,                    # align weight; original: tuned per dataset, 0.25-0.75
            "contrastive_weight": 0.1,       # original: a separate encoder pre-training stage
            "n_negatives": 3,                # original: in-batch negatives, batch size 4
            "tau": 1.0,                      # InfoNCE temperature (original: 1, no temperature)
            "max_reason_tokens": 256,        # original: max_seq_len 512
            "condense": "teacher",           # "teacher" | "heuristic" (original: GPT-4o-mini)
            "condense_max_new_tokens": 48,
            "condense_words": 24,            # original: "within 10 words"
            "max_answer_tokens": 32,         # when gen has no force_answer_tokens (original: 30)
        },
        teacher_data_keys=("condense", "condense_max_new_tokens", "condense_words"), teacher_data=True,
        own_inference=True,
        teacher_calls=lambda p: (0, 0) if p["condense"] == "heuristic" else (1, p["condense_max_new_tokens"])),
    Baseline(
        "cwt", "CWT: chunk-wise CoT supervision, then learning to skip chunks",
        defaults={
            "n_chunks": 4,             # paper: not checked
            "chunking": "search",      # "average" (AC) | "search" (SBC, the paper's main variant)
            "snap_window": 0.3,        # average chunks a boundary may move to a sentence start (ours)
            "search_window": 0.5,      # average chunks a boundary may move in the search (paper: not checked)
            "skip_from_epoch": 1,      # 0-based epoch STT starts (paper: not checked)
            "skip_tolerance": 0.05,    # nats per answer token (paper: not checked)
        }),
)}
