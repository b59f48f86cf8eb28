"""Evaluation stages: per-instance metrics of one (student, method), the tables and Figure 9.

`run_evaluate` writes results/{dataset}/{student}/{method}/metrics.parquet in long format
(dataset, student, method, doc_id, metric, value); a corpus-level value (macro-F1, corpus BLEU,
LAS) has doc_id "". Metrics:

    task        P@k, nDCG@k, PSP@k, R@k, f1 (instance), exact_match; corpus macro_f1, micro_f1
    behaviour   focus, confusion (the student's own CoT, trajectories rule)
    fidelity    bleu4 vs the teacher's trace; perplexity of the teacher's trace under the student
    LAS         per-document contributions w_i (c_xr - c_x), whose mean is LAS; corpus las, sim_acc_*
    mechanism   sharpness, anchor_align, loopback, helpfulness of the student's pooled heads
                (its pre-training pools) under teacher forcing on the teacher's test CoT

LAS simulator: trained on the TRAIN split with the teacher's traces as rationales and the
teacher's first predicted label as target, then asked to simulate the student on the test split
from the student's own rationale and answer (the student has no train-split traces).
"""

from __future__ import annotations

import json
import logging
from pathlib import Path

import numpy as np
import pandas as pd
import torch

from ..errors import ConfigError
from ..io import read_parquet, write_parquet

log = logging.getLogger(__name__)

COLUMNS = ["dataset", "student", "method", "doc_id", "metric", "value"]


def las_contributions(correct: dict[str, np.ndarray]) -> np.ndarray:
    """Per-document LAS terms w_i (c_xr,i - c_x,i), w = 0.5 n / n_group, so their mean is LAS (a group
    with no document gives the other group weight n / n_group, i.e. LAS = that group's mean)."""
    x, xr, leak = (np.asarray(correct[k], dtype=bool) for k in ("x", "xr", "r"))
    gain = xr.astype(float) - x.astype(float)
    n = len(gain)
    groups = [g for g in (leak, ~leak) if g.any()]
    weight = np.zeros(n)
    for g in groups:
        weight[g] = n / (len(groups) * int(g.sum()))
    return weight * gain


@torch.no_grad()
def mechanism_metrics(model, examples, pools: dict, tau: float) -> pd.DataFrame:
    """Sharpness, AnchorAlign (Phase 1) and LoopBack, Helpfulness (Phase 2) per document: means over
    the valid positions of the model's pooled signals -> doc_id, metric, value."""
    from ..distill.signals import forward_signals

    rows = []
    for ex in examples:
        _, signals = forward_signals(model, ex, pools, tau)
        for phase, names in (("phase1", (("sharpness", "kurtosis"), ("anchor_align", "align"))),
                             ("phase2", (("loopback", "loopback"), ("helpfulness", "helpfulness")))):
            sig = signals.get(phase)
            if sig is None or not sig["mask"].any():
                continue
            mask = sig["mask"][0]
            rows += [(ex.doc_id, metric, float(sig[key][0][mask].double().mean())) for metric, key in names]
    return pd.DataFrame(rows, columns=["doc_id", "metric", "value"])


def run_evaluate(config: dict, dataset: str, student: str, method: str, paths: dict, out_path) -> None:
    """paths: pred, test_docs, train_docs, test_prompts, teacher_test_cot, teacher_train_cot,
    test_anchors, labels, trajectory_summary, student_coarse, student_refine, model (dir)."""
    from ..distill.stages import head_pools, load_examples
    from ..prompts import render_prompt
    from .las import las_from_correctness, simulator_correctness, target_label
    from .text import bleu4, sentence_bleu4, trace_perplexity
    from .xmc import per_instance, summarize

    ecfg = config["evaluate"]
    pred = read_parquet(paths["pred"]).set_index("doc_id")
    docs = read_parquet(paths["test_docs"], "documents").set_index("doc_id")
    train_docs = read_parquet(paths["train_docs"], "documents")
    prompts = read_parquet(paths["test_prompts"], "prompts").set_index("doc_id")
    teacher = read_parquet(paths["teacher_test_cot"], "cot").set_index("doc_id")
    ids = [d for d in docs.index if d in pred.index]
    missing = sorted(set(docs.index) - set(pred.index))
    if missing:
        log.warning("%s: %d test documents have no prediction (scored as empty answers): %s", paths["pred"],
                    len(missing), missing[:5])
        ids = list(docs.index)
    answers = [list(pred.loc[d, "pred_labels"]) if d in pred.index else [] for d in ids]
    gold = [list(docs.loc[d, "labels"]) for d in ids]
    excluded = None  # ECLARE-style removal of filter_labels_test pairs (LF-WikiSeeAlso), when the adapter wrote them
    excluded_path = Path(paths["test_docs"]).parent / "excluded_pairs.parquet"
    if excluded_path.exists():
        pairs_df = read_parquet(excluded_path)
        excluded = set(zip(pairs_df["doc_id"], pairs_df[[c for c in pairs_df.columns if c != "doc_id"][0]]))
        log.info("%s: removing %d excluded (doc, label) pairs before scoring", excluded_path, len(excluded))
    propensity = ecfg["propensity"].get(dataset, {}) if isinstance(ecfg.get("propensity"), dict) else {}
    kw = dict(train_labels=[list(x) for x in train_docs["labels"]], ks=ecfg["ks"], A=propensity.get("A", 0.55),
              B=propensity.get("B", 1.5), doc_ids=ids, excluded_pairs=excluded,
              candidates=[list(prompts.loc[d, "candidates"]) for d in ids])
    frames = [per_instance(gold, answers, **kw)[["doc_id", "metric", "value"]],
              summarize(gold, answers, **kw).query("metric in ['macro_f1', 'micro_f1']").assign(doc_id="")]

    # behaviour: the student's own Focus / Confusion
    summary = read_parquet(paths["trajectory_summary"])
    frames.append(summary.melt(id_vars="doc_id", value_vars=["focus", "confusion"], var_name="metric"))

    # fidelity to the teacher's trace
    student_cot = [str(pred.loc[d, "cot"]) if d in pred.index else "" for d in ids]
    teacher_cot = [str(teacher.loc[d, "cot"]) if d in teacher.index else "" for d in ids]
    frames.append(pd.DataFrame({"doc_id": ids, "metric": "bleu4", "value": sentence_bleu4(student_cot, teacher_cot)}))
    frames.append(pd.DataFrame({"doc_id": [""], "metric": ["bleu4_corpus"], "value": [bleu4(student_cot, teacher_cot)]}))
    model, tok = _load_student(config, student, method, paths["model"])
    prompt_texts = [render_prompt(tok, json.loads(prompts.loc[d, "messages"])) for d in ids]
    has_trace = [i for i, c in enumerate(teacher_cot) if c.strip()]
    ppl = trace_perplexity(model, tok, [prompt_texts[i] for i in has_trace], [teacher_cot[i] for i in has_trace],
                           batch_size=1, device=str(next(model.parameters()).device))
    frames.append(pd.DataFrame({"doc_id": [ids[i] for i in has_trace], "metric": "perplexity", "value": ppl}))

    # LAS (Hase et al. 2020) with the light embedding simulator
    frames.append(_las_frame(paths, train_docs, ids, docs, student_cot, answers, simulator_factory(config),
                             simulator_correctness, las_from_correctness, target_label))

    # mechanism: the student's pooled heads on the teacher's test CoT
    pools = head_pools(config, model, paths["student_coarse"], paths["student_refine"])
    examples = load_examples(config, student, tok, paths["test_docs"], paths["test_prompts"],
                             paths["teacher_test_cot"], paths["test_anchors"], paths["labels"])
    frames.append(mechanism_metrics(model, examples, pools, config["heads"]["tau"]))

    out = pd.concat(frames, ignore_index=True)
    out.insert(0, "method", method)
    out.insert(0, "student", student)
    out.insert(0, "dataset", dataset)
    out["value"] = out["value"].astype(float)
    means = out.groupby("metric")["value"].mean()
    log.info("evaluate %s/%s on %s (%d documents): %s", student, method, dataset, len(ids),
             ", ".join(f"{m}={means[m]:.4g}" for m in ("P@1", "macro_f1", "focus", "confusion", "las", "bleu4",
                                                        "perplexity", "sharpness", "anchor_align", "loopback",
                                                        "helpfulness") if m in means))
    write_parquet(out[COLUMNS], out_path)


def _load_student(config: dict, student: str, method: str, model_dir):
    from ..distill.stages import with_distilled_model
    from ..models import load_model

    cfg, name = with_distilled_model(config, student, method, model_dir)
    return load_model(cfg, name, device=config["evaluate"]["device"], dtype="float32")


def simulator_factory(config: dict):
    """A no-argument factory of fresh LAS simulators, as `evaluate.las_simulator` says."""
    from ..embed import SentenceEmbedder
    from .las import make_simulator

    kind = config["evaluate"]["las_simulator"]
    if kind == "seq2seq":
        settings = dict(config["evaluate"]["las_seq2seq"])
        if not settings.get("model"):
            raise ConfigError("evaluate.las_simulator is seq2seq but evaluate.las_seq2seq.model is not set. "
                              "Fix: give a seq2seq model (hub id in the local cache, or a directory), e.g. t5-base")
        settings["model_name_or_path"] = settings.pop("model")
        return lambda: make_simulator("seq2seq", seed=config["seed"], **settings)
    embedder = SentenceEmbedder(config["embedder"])
    return lambda: make_simulator(kind, encoder=embedder)


def _las_frame(paths, train_docs, ids, docs, student_cot, answers, make_simulator, correctness_fn,
               las_fn, target_fn) -> pd.DataFrame:
    train_docs = train_docs.set_index("doc_id")
    teacher_train = read_parquet(paths["teacher_train_cot"], "cot").set_index("doc_id")
    train_ids = [d for d in train_docs.index if d in teacher_train.index]
    train_targets = [target_fn(list(teacher_train.loc[d, "pred_labels"])) for d in train_ids]
    test_targets = [target_fn(a) for a in answers]
    keep = [i for i, t in enumerate(test_targets) if t is not None]
    if not keep or not any(t is not None for t in train_targets):
        log.warning("LAS: no simulation target (no predicted label) on the %s split; LAS is NaN",
                    "test" if not keep else "train")
        return pd.DataFrame({"doc_id": [""], "metric": ["las"], "value": [float("nan")]})
    correct = correctness_fn(make_simulator,
                             [train_docs.loc[d, "text"] for d in train_ids],
                             [str(teacher_train.loc[d, "cot"]) for d in train_ids], train_targets,
                             [docs.loc[ids[i], "text"] for i in keep], [student_cot[i] for i in keep],
                             [test_targets[i] for i in keep])
    stats = las_fn(correct["x"], correct["xr"], correct["r"])
    rows = pd.DataFrame({"doc_id": [ids[i] for i in keep], "metric": "las", "value": las_contributions(correct)})
    corpus = pd.DataFrame({"doc_id": "", "metric": ["las_corpus", "sim_acc_xr", "sim_acc_x", "sim_acc_r"],
                           "value": [stats["las"], stats["sim_acc_xr"], stats["sim_acc_x"], stats["sim_acc_r"]]})
    return pd.concat([rows, corpus], ignore_index=True)


def run_tables(config: dict, metrics_paths: list[str], out_dir) -> None:
    """Tables 1-4 as results/tables/table{N}.{csv,md,tex} from every metrics file of the config."""
    from .tables import build_table, load_metrics, table_spec, write_table

    metrics = load_metrics(metrics_paths) if metrics_paths else pd.DataFrame(columns=COLUMNS)
    for table in ("table1", "table2", "table3", "table4"):
        spec = table_spec(config, table)
        built = build_table(metrics, spec["datasets"], spec["students"], spec["methods"],
                            n_resamples=config["evaluate"]["n_bootstrap"], seed=config["seed"])
        write_table(built, Path(out_dir) / table, caption=spec["caption"])
        log.info("%s: %d rows (%s)", table, len(built), spec["caption"])


def run_figure9(config: dict, metrics_paths: list[str], out_png) -> None:
    """Figure 9: LAS of the phase and term ablations (first dataset and student of the config)."""
    from ..plots import figure9
    from .tables import figure9_data, load_metrics

    dataset, student = next(iter(config["datasets"])), (config.get("students") or [""])[0]
    metrics = load_metrics(metrics_paths) if metrics_paths else pd.DataFrame(columns=COLUMNS)
    data = figure9_data(metrics, dataset, student, list(config.get("methods", {})),
                        n_resamples=config["evaluate"]["n_bootstrap"], seed=config["seed"])
    title = f"Figure 9 - LAS of the ablations ({dataset}, {student}; teacher {config['teacher']})"
    missing = [m for m in config.get("methods", {}) if m not in set(data.dropna(subset=["mean"])["method"])]
    if missing:  # e.g. students that predicted no label: LAS has no simulation target
        title += f"\nno LAS for: {', '.join(missing)}"
    figure9(data, out_png, title)

