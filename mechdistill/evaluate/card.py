"""The model card of a published student: README.md in its model/ folder, written with huggingface_hub's
ModelCard, so the folder says what it is wherever it is found (a shared disk, a hub) and still loads with
`AutoModelForCausalLM.from_pretrained`.

The card names the teacher and the student's base (their model specs), the method with its kind, grid
point, loss weights and settings, the dataset with the documents it trained and validated on, the steps,
the selected step and criterion, the command and commit that trained it, and, once evaluated, the test
metrics (each as the tables show it, `tables.metric_values`), also in the hub's `model-index` metadata.
"""

from __future__ import annotations

import json
import os
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from ..io import write_text

if TYPE_CHECKING:
    from huggingface_hub import ModelCard

CARD_FILE = "README.md"
NOT_EVALUATED = "Not evaluated yet: the `evaluate` stage writes metrics.parquet, then `model_card` adds it here."


@dataclass(frozen=True)
class StudentFacts:
    """What a published student is and how it was made."""

    dataset: str
    student: str                      # its name in config["models"]
    student_spec: Mapping[str, Any]   # config["models"][student]: where its base weights come from
    teacher: str
    teacher_spec: Mapping[str, Any]
    method: str
    kind: str                         # ours | baseline | ablation (distill.methods)
    description: str                  # what the method trains on
    point: str                        # the selected grid point
    settings: Mapping[str, Any]       # the method's entry at that point (params, weights, train)
    weights: Mapping[str, float]      # distill.weights with the entry's weights over them
    docs: Mapping[str, int]           # split -> documents it trained / validated on (training_items)
    steps: int                        # optimizer steps trained
    selection: Mapping[str, Any]      # selection.json: criterion, step, value, candidates
    command: str                      # the distill job's command line
    commit: str                       # the mechdistill commit that trained it ("unknown" outside git)


def _spec_text(name: str, spec: Mapping[str, Any]) -> str:
    return f"`{name}` ({', '.join(f'{k}: {v}' for k, v in spec.items())})"


def _hub_id(spec: Mapping[str, Any]) -> str | None:
    return spec.get("id") if spec.get("source") == "hf" else None


def _facts_table(facts: StudentFacts) -> str:
    selection = facts.selection
    value = selection.get("value")
    rows = [
        ("Teacher", _spec_text(facts.teacher, facts.teacher_spec)),
        ("Student base", _spec_text(facts.student, facts.student_spec)),
        ("Method", f"`{facts.method}` ({facts.kind}): {facts.description}"),
        ("Loss weights", "".join(f"{k} = {v}; " for k, v in facts.weights.items()) + "a weight left out is 1"),
        ("Method settings", f"`{json.dumps(dict(facts.settings), sort_keys=True)}`"),
        ("Dataset", f"`{facts.dataset}`: " + ", ".join(f"{n} {split} documents" for split, n in facts.docs.items())),
        ("Steps", f"{facts.steps} optimizer steps"),
        ("Selected", f"grid point `{facts.point}` (of {len(selection.get('candidates', [])) or 1}), step "
                     f"{selection.get('step')}, by {selection.get('criterion')}"
                     + (f" = {value:.6g}" if isinstance(value, float) else "")),
        ("Trained by", f"`{facts.command}` at commit `{facts.commit}`"),
    ]
    return "| | |\n|---|---|\n" + "\n".join(f"| {name} | {text.replace('|', '/')} |" for name, text in rows)


def _metrics_section(facts: StudentFacts, metrics: Mapping[str, float] | None, test_docs: int | None) -> str:
    if metrics is None:
        return NOT_EVALUATED
    lines = [f"On the test split of `{facts.dataset}` ({test_docs} documents): per-document metrics averaged, "
             "corpus metrics (macro-F1, LAS) as their evaluator computed them, as in the result tables.", "",
             "| metric | value |", "|---|---|"]
    return "\n".join(lines + [f"| {name} | {value:.6g} |" for name, value in metrics.items()])


def model_card(facts: StudentFacts, metrics: Mapping[str, float] | None = None,
               test_docs: int | None = None) -> ModelCard:
    """The card of `facts`' student; `metrics` (name -> value; None: not evaluated yet) from the test split."""
    # huggingface_hub (~0.5 s) only in the jobs that write a card, not in every model-free job importing this module
    from huggingface_hub import EvalResult, ModelCard, ModelCardData

    title = f"{facts.student} distilled from {facts.teacher} with {facts.method}"
    results = [EvalResult(task_type="text-generation", dataset_type=facts.dataset, dataset_name=facts.dataset,
                          dataset_split="test", metric_type=name, metric_name=name, metric_value=value)
               for name, value in (metrics or {}).items() if value == value]  # (NaN: not in the index)
    data = ModelCardData(library_name="transformers", base_model=_hub_id(facts.student_spec), model_name=title,
                         tags=["mechdistill", "distillation", facts.method], eval_results=results or None)
    body = (f"# {title}\n\nA student trained by mechdistill (Characterize Then Distill) to reason like its teacher "
            f"on `{facts.dataset}`.\n\n## Training\n\n{_facts_table(facts)}\n\n## Evaluation\n\n"
            f"{_metrics_section(facts, metrics, test_docs)}\n\n## Use\n\n```python\n"
            "from transformers import AutoModelForCausalLM, AutoTokenizer\n\n"
            'folder = "path/to/this/model"  # the folder this card is in\n'
            "model = AutoModelForCausalLM.from_pretrained(folder)\ntokenizer = AutoTokenizer.from_pretrained(folder)\n```\n")
    return ModelCard(f"---\n{data.to_yaml()}\n---\n\n{body}")


def write_model_card(model_dir: str | os.PathLike, facts: StudentFacts, metrics: Mapping[str, float] | None = None,
                     test_docs: int | None = None) -> Path:
    """Write `model_card` as model_dir/README.md (atomically); returns its path."""
    path = Path(model_dir) / CARD_FILE
    write_text(path, str(model_card(facts, metrics, test_docs)))
    return path
