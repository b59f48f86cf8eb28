"""rules/evaluate.smk: evaluate, tables, figure9.

`run_evaluate` writes results/{dataset}/{student}/{method}/metrics.parquet in long format
(dataset, student, method, doc_id, metric, value); a corpus-level value (macro-F1, corpus BLEU,
LAS) has doc_id "", macro-F1 on bootstrap resample s of the test set doc_id "resample:<s>".
With method "teacher" (student = the teacher) it is the teacher's row of the tables. Metrics:

    task        P@k, nDCG@k, PSP@k, R@k, f1 (instance), exact_match; corpus macro_f1, micro_f1;
                macro_f1 per resample (the paired bootstrap of App. E)
    behaviour   focus, confusion (the student's own CoT, trajectories rule)
    fidelity    bleu4 vs the teacher's trace (not for the teacher); perplexity of the teacher's trace
    LAS         las: per-document contributions w_i (c_xr - c_x), whose mean is LAS in [-1, 1];
                sim_correct_xr per document; corpus las_corpus and the accuracies sim_acc_xr, sim_acc_x, sim_acc_r
    mechanism   sharpness, anchor_align, loopback, helpfulness of the student's pooled heads
                (its pre-training pools) under teacher forcing on the teacher's test CoT

LAS simulators (`evaluate.las`): `run_las_simulator` (rule las_simulator) trains them ONCE per
dataset on the TRAIN split with the teacher's traces as rationales and saves them
(results/{dataset}/las_simulator/); every evaluate job of that dataset (each student and method,
and the teacher's row) loads the same simulators and scores its own test rationales (the student
has no train-split traces), so methods differ by their rationales only, not by a retrained
simulator. Target (`evaluate.las.target`): the teacher's answer (default, the paper's
teacher-faithfulness), the gold labels, or the student's answer; the simulators learn the teacher's
answers for teacher and student, the gold labels for gold. One class per document
(`evaluate.las.target_form`, `reduce_target` in evaluate/las.py). The x+r input keeps the whole
rationale within the simulator's token budget (the document is cut to fit).
"""

from __future__ import annotations

import json
import logging
import os
from pathlib import Path

import pandas as pd

from .. import paths
from ..anchors.embed import SentenceEmbedder
from ..characterize.teacher_forcing import length_cap
from ..distill.pools import model_pools
from ..distill.signals import make_examples, mechanism_metrics
from ..errors import InputError
from ..evaluate.las import (
    MANIFEST,
    fit_view_simulators,
    las_rows,
    load_manifest,
    load_view_simulators,
    save_view_simulators,
    simulation_test_targets,
    simulation_train_targets,
    simulator_factory,
    simulator_identity,
    train_target_source,
    view_correctness,
)
from ..evaluate.settings import EvaluateSettings, LasSimulatorSettings
from ..evaluate.tables import METRIC_COLUMNS
from ..evaluate.text import bleu4, sentence_bleu4, trace_perplexity
from ..evaluate.xmc import RESAMPLE, macro_f1_resample_rows, per_instance, summarize
from ..inflight import in_flight, in_flight_workers
from ..io import read_parquet, read_split, write_parquet
from ..models import ModelCatalog, load_model, with_distilled_model
from ..teacher.prompts import render_prompt

log = logging.getLogger(__name__)
PathLike = str | os.PathLike
LAS_SEP = "\n\n"  # between document and rationale in the simulators' x+r view
LOGGED = ("P@1", "macro_f1", "focus", "confusion", "las", "sim_acc_xr", "bleu4", "perplexity", "sharpness", "anchor_align",
          "loopback", "helpfulness")


def run_evaluate(config: dict, dataset: str, student: str, method: str, *,
                 inputs: dict[str, PathLike] | None = None, out_path: PathLike | None = None) -> None:
    """Every metric of one distilled student on the test split -> {student}/{method}/metrics.parquet;
    with method "teacher" and student = the teacher, the teacher's row of Tables 1-4 (its own test
    CoT as prediction, its own pooled heads, no BLEU).

    The model's forwards (the trace perplexity, the mechanism metrics) run `evaluate.in_flight` documents at
    once, each in its own thread, with the results of one at a time (`inflight.in_flight`).

    inputs: overrides of `paths.evaluate_inputs` (model: the student's config.json, whose folder is
    loaded) and of excluded_pairs.
    """
    evaluate, is_teacher = EvaluateSettings.from_config(config), method == paths.TEACHER_METHOD
    settings = evaluate.section
    p = {**paths.evaluate_inputs(config, dataset, student, method), "excluded_pairs": paths.excluded_pairs(dataset),
         **(inputs or {})}
    pred = read_parquet(p["pred"]).set_index("doc_id")
    docs = read_parquet(p["test_docs"], "documents").set_index("doc_id")
    train_docs = read_parquet(p["train_docs"], "documents").set_index("doc_id")
    prompts = read_parquet(p["test_prompts"], "prompts").set_index("doc_id")
    teacher_cot = read_parquet(p["teacher_test_cot"], "cot").set_index("doc_id")
    ids = [d for d in docs.index if d in pred.index]
    missing = sorted(set(docs.index) - set(pred.index))
    if missing:
        log.warning("%s: %d test documents have no prediction (scored as empty answers): %s", p["pred"],
                    len(missing), missing[:5])
        ids = list(docs.index)
    answers = [list(pred.loc[d, "pred_labels"]) if d in pred.index else [] for d in ids]
    gold = [list(docs.loc[d, "labels"]) for d in ids]

    frames = _task_frames(evaluate, dataset, p["excluded_pairs"], ids, gold, answers, train_docs, prompts)

    # behaviour: the model's own Focus / Confusion
    summary = read_parquet(p["trajectory_summary"])
    frames.append(summary.melt(id_vars="doc_id", value_vars=["focus", "confusion"], var_name="metric"))

    # fidelity to the teacher's trace (BLEU against itself would be 100: not for the teacher)
    student_cot = [str(pred.loc[d, "cot"]) if d in pred.index else "" for d in ids]
    teacher_text = [str(teacher_cot.loc[d, "cot"]) if d in teacher_cot.index else "" for d in ids]
    if not is_teacher:
        frames.append(pd.DataFrame({"doc_id": ids, "metric": "bleu4", "value": sentence_bleu4(student_cot, teacher_text)}))
        frames.append(pd.DataFrame({"doc_id": [""], "metric": ["bleu4_corpus"],
                                    "value": [bleu4(student_cot, teacher_text)]}))
    catalog = ModelCatalog.from_config(config)
    catalog, name = (catalog, student) if is_teacher else with_distilled_model(catalog, student, method,
                                                                               Path(p["model"]).parent)
    model, tokenizer = load_model(catalog, name, device=settings["device"], dtype=settings["dtype"], **evaluate.placement)
    model.eval()  # once, here: the forwards below may run in threads, each leaving the model's mode as found
    workers = in_flight_workers(model, evaluate.in_flight)
    prompt_texts = [render_prompt(tokenizer, json.loads(prompts.loc[d, "messages"])) for d in ids]
    has_trace = [i for i, c in enumerate(teacher_text) if c.strip()]
    ppl = list(in_flight(lambda i: trace_perplexity(model, tokenizer, [prompt_texts[i]], [teacher_text[i]],
                                                    batch_size=1)[0], has_trace, workers))
    frames.append(pd.DataFrame({"doc_id": [ids[i] for i in has_trace], "metric": "perplexity", "value": ppl}))

    frames.append(_las_frame(evaluate, p["las_simulator"], teacher_cot, docs, ids, gold, answers, student_cot))

    # mechanism: the model's pooled heads (its own head scores) on the teacher's test CoT
    pools = model_pools(evaluate.pools, model, p["student_coarse"], p["student_refine"])
    test_split = read_split({"docs": p["test_docs"], "prompts": p["test_prompts"], "cot": p["teacher_test_cot"],
                             "anchors": p["test_anchors"], "labels": p["labels"]})
    examples = make_examples(tokenizer, test_split, student, length_cap(evaluate.max_tokens, model))
    frames += in_flight(lambda example: mechanism_metrics(model, [example], pools, evaluate.signals.tau,
                                                          evaluate.signals.coarse), examples, workers)

    out = pd.concat(frames, ignore_index=True)
    out.insert(0, "method", method)
    out.insert(0, "student", student)
    out.insert(0, "dataset", dataset)
    out["value"] = out["value"].astype(float)
    means = out[~out["doc_id"].str.startswith(RESAMPLE)].groupby("metric")["value"].mean()
    log.info("evaluate %s/%s on %s (%d documents): %s", student, method, dataset, len(ids),
             ", ".join(f"{m}={means[m]:.4g}" for m in LOGGED if m in means))
    write_parquet(out[METRIC_COLUMNS], out_path or paths.metrics(dataset, student, method))


def _task_frames(evaluate: EvaluateSettings, dataset: str, excluded_path: PathLike, ids: list[str],
                 gold: list[list[str]], answers: list[list[str]], train_docs: pd.DataFrame,
                 prompts: pd.DataFrame) -> list[pd.DataFrame]:
    """Task: XMC metrics per document, corpus macro/micro-F1 and macro-F1 per bootstrap resample, without
    the excluded (doc, label) pairs when the adapter wrote them (ECLARE)."""
    settings = evaluate.section
    excluded = None
    if Path(excluded_path).exists():
        pairs = read_parquet(excluded_path)
        excluded = set(zip(pairs["doc_id"], pairs[[c for c in pairs.columns if c != "doc_id"][0]]))
        log.info("%s: removing %d excluded (doc, label) pairs before scoring", excluded_path, len(excluded))
    propensity = settings["propensity"].get(dataset, {})
    kw = dict(train_labels=[list(x) for x in train_docs["labels"]], ks=settings["ks"], A=propensity.get("A", 0.55),
              B=propensity.get("B", 1.5), doc_ids=ids, excluded_pairs=excluded,
              candidates=[list(prompts.loc[d, "candidates"]) for d in ids])
    return [per_instance(gold, answers, **kw)[["doc_id", "metric", "value"]],
            summarize(gold, answers, **kw).query("metric in ['macro_f1', 'micro_f1']").assign(doc_id=""),
            macro_f1_resample_rows(gold, answers, settings["n_bootstrap"], evaluate.seed, ids, excluded)]


def _las_frame(evaluate: EvaluateSettings, simulator_dir: PathLike, teacher_cot: pd.DataFrame, docs: pd.DataFrame,
               ids: list[str], gold: list[list[str]], answers: list[list[str]], student_cot: list[str]) -> pd.DataFrame:
    """LAS (Hase et al. 2020) of the test rationales `student_cot`, scored by the dataset's saved
    simulators (`run_las_simulator`; none is trained here)."""
    las = evaluate.section["las"]
    manifest = load_manifest(simulator_dir)
    expected = simulator_identity(las, evaluate.embedder)
    stale = {k: (manifest.get(k), v) for k, v in expected.items() if manifest.get(k) != v}
    if stale:
        raise InputError(f"the LAS simulators do not match evaluate.las (saved, configured): {stale}",
                         file=str(simulator_dir), fix="rerun the las_simulator rule")
    test_targets = simulation_test_targets(
        las["target"], las["target_form"], manifest["label_frequency"],
        test_teacher=[list(teacher_cot.loc[d, "pred_labels"]) if d in teacher_cot.index else [] for d in ids],
        test_gold=gold, test_student=answers)
    keep = [i for i, t in enumerate(test_targets) if t is not None]
    if not keep or not manifest["trained"]:
        log.warning("LAS: no simulation target (no label in the target answers) on the %s split; LAS is NaN",
                    "train" if not manifest["trained"] else "test")
        return las_rows(None, [])
    encoder = None if las["simulator"] == "seq2seq" else SentenceEmbedder(evaluate.embedder)
    truncator, simulators = load_view_simulators(simulator_dir, encoder, device=las["seq2seq"]["device"])
    correct = view_correctness(simulators, truncator, [docs.loc[d, "text"] for d in ids], student_cot, test_targets,
                               manifest["sep"])
    return las_rows(correct, [ids[i] for i in keep])


def run_las_simulator(config: dict, dataset: str, *, inputs: dict[str, PathLike] | None = None,
                      out_dir: PathLike | None = None) -> None:
    """Train the dataset's LAS simulators once (one per view, evaluate/las.py `fit_view_simulators`)
    on the train split, the teacher's traces as rationales and its answers (gold labels for target
    gold) as targets, and save them with their manifest -> results/{dataset}/las_simulator/.

    inputs: overrides of train_docs and teacher_train_cot.
    """
    settings = LasSimulatorSettings.from_config(config)
    las = settings.las
    p = {"train_docs": paths.data(dataset, "train"), "teacher_train_cot": paths.cot(dataset, config["teacher"], "train"),
         **(inputs or {})}
    teacher_train = read_parquet(p["teacher_train_cot"], "cot").set_index("doc_id")
    train_docs = read_parquet(p["train_docs"], "documents").set_index("doc_id")
    train_ids = [d for d in train_docs.index if d in teacher_train.index]
    source = train_target_source(las["target"])
    targets, frequency = simulation_train_targets(
        source, las["target_form"], train_teacher=[list(teacher_train.loc[d, "pred_labels"]) for d in train_ids],
        train_gold=[list(train_docs.loc[d, "labels"]) for d in train_ids])
    seq2seq = las["simulator"] == "seq2seq"
    with_target = [t for t in targets if t is not None]
    manifest = {**simulator_identity(las, settings.embedder), "label_frequency": frequency, "sep": LAS_SEP,
                "n_train": len(with_target), "n_classes": len(set(with_target)), "trained": bool(with_target),
                "seq2seq": las["seq2seq"] if seq2seq else None}
    out = Path(out_dir or paths.las_simulator(dataset))
    log.info("las_simulator %s: %s simulators on %d train documents (%s answers, %s targets, %d classes)",
             dataset, las["simulator"], len(with_target), source, las["target_form"], manifest["n_classes"])
    if not with_target:
        log.warning("LAS: no simulation target (no label in the %s answers) on the train split; no simulator", source)
        out.mkdir(parents=True, exist_ok=True)
        (out / MANIFEST).write_text(json.dumps(manifest, indent=1, sort_keys=True))
        return
    encoder = None if seq2seq else SentenceEmbedder(settings.embedder)
    simulators = fit_view_simulators(simulator_factory(las, settings.seed, encoder),
                                     [train_docs.loc[d, "text"] for d in train_ids],
                                     [str(teacher_train.loc[d, "cot"]) for d in train_ids], targets, LAS_SEP)
    save_view_simulators(out, simulators, manifest)
