"""LAS simulation targets compared on a finished demo run: top_label against label_set.

    PYTHONPATH=. HF_HUB_OFFLINE=1 python benchmarks/las_target_form.py --results /work/after/demo/results \
        [--config config/config.yaml] [--out benchmarks/results/las_target_form]

For each `evaluate.las.target_form` (evaluate/las.py `reduce_target`): the dataset's simulators are
trained once, as the las_simulator rule does (`stages.evaluate.run_las_simulator`: the config's
simulator, the demo's logreg over MiniLM, on the teacher's train traces, target `evaluate.las.target`),
then every method's test rationales and the teacher's own are scored with them (`view_correctness`).
Per form and model it reports LAS and the simulators' accuracies on x, x+r and r; per form, the
number of training classes and the share of test targets that are a training class (no view can
name any other: the accuracies' ceiling). Writes <out>.json and <out>.md.

With --synthetic N it adds the same structure at a size the demo run lacks, without a teacher: N train
and N/4 test vignettes of the demo's generator (data/icd10cm_controlled.py, the demo's codes_per_doc
and seed), target gold. Per form: classes, ceiling, the majority class's test accuracy, and the test
accuracy of the x-only simulator (the demo's logreg over MiniLM on the documents alone).
"""

from __future__ import annotations

import argparse
import json
import tempfile
from pathlib import Path

import pandas as pd

from mechdistill import paths
from mechdistill.anchors.embed import SentenceEmbedder
from mechdistill.config import load_config
from mechdistill.evaluate.las import (
    TARGET_FORMS,
    las_from_correctness,
    load_manifest,
    load_view_simulators,
    simulation_test_targets,
    view_correctness,
)
from mechdistill.evaluate.settings import EvaluateSettings
from mechdistill.io import read_parquet
from mechdistill.stages.evaluate import run_las_simulator


def rationales(results: Path, dataset: str, teacher: str, students: list[str], methods: list[str]) -> dict:
    """model row -> its test predictions (the teacher's own CoT, each distilled student's)."""
    runs = {f"{teacher}/teacher": results / paths.cot(dataset, teacher, "test").removeprefix("results/")}
    runs |= {f"{s}/{m}": results / paths.student_pred(dataset, s, m, "test").removeprefix("results/")
             for s in students for m in methods}
    return {name: read_parquet(path, "cot").set_index("doc_id") for name, path in runs.items() if path.exists()}


def compare(config: dict, results: Path, dataset: str) -> dict:
    teacher, las = config["teacher"], EvaluateSettings.from_config(config).section["las"]
    docs = read_parquet(results / paths.data(dataset, "test").removeprefix("results/"), "documents").set_index("doc_id")
    teacher_test = read_parquet(results / paths.cot(dataset, teacher, "test").removeprefix("results/"),
                                "cot").set_index("doc_id")
    preds = rationales(results, dataset, teacher, list(config["students"]), list(config["methods"]))
    ids = list(docs.index)
    encoder = SentenceEmbedder(config["embedder"])
    out = {"dataset": dataset, "simulator": las["simulator"], "target": las["target"], "n_test": len(ids),
           "forms": {}}
    for form in TARGET_FORMS:
        form_config = {**config, "evaluate": {**config["evaluate"], "las": {**config["evaluate"]["las"],
                                                                             "target_form": form}}}
        with tempfile.TemporaryDirectory() as tmp:
            run_las_simulator(form_config, dataset, out_dir=tmp, inputs={
                "train_docs": results / paths.data(dataset, "train").removeprefix("results/"),
                "teacher_train_cot": results / paths.cot(dataset, teacher, "train").removeprefix("results/")})
            manifest = load_manifest(tmp)
            train_classes = None
            rows = {}
            for name, pred in preds.items():
                answers = [list(pred.loc[d, "pred_labels"]) if d in pred.index else [] for d in ids]
                cot = [str(pred.loc[d, "cot"]) if d in pred.index else "" for d in ids]
                targets = simulation_test_targets(
                    las["target"], form, manifest["label_frequency"],
                    test_teacher=[list(teacher_test.loc[d, "pred_labels"]) for d in ids],
                    test_gold=[list(docs.loc[d, "labels"]) for d in ids], test_student=answers)
                truncator, simulators = load_view_simulators(tmp, encoder)
                simulators = list(simulators)
                if train_classes is None:
                    train_classes = {str(c) for c in simulators[0][1].classes}
                correct = view_correctness(simulators, truncator, [docs.loc[d, "text"] for d in ids], cot, targets,
                                           manifest["sep"])
                stats = las_from_correctness(correct["x"], correct["xr"], correct["r"])
                kept = [t for t in targets if t is not None]
                rows[name] = {"las": stats["las"], "sim_acc_x": stats["sim_acc_x"], "sim_acc_xr": stats["sim_acc_xr"],
                              "sim_acc_r": stats["sim_acc_r"], "n_scored": len(kept),
                              "targets_seen_in_training": sum(t in train_classes for t in kept) / max(len(kept), 1)}
        out["forms"][form] = {"n_train": manifest["n_train"], "n_classes": manifest["n_classes"], "models": rows}
    return out


def synthetic(config: dict, dataset: str, n_train: int) -> dict:
    """Gold label sets of the demo's generator at `n_train` train / n_train // 4 test documents: how
    each target form shapes the classes and the x-only simulator."""
    from mechdistill.data.icd10cm_controlled import load_icd10cm_controlled
    from mechdistill.evaluate.las import EmbeddingSimulator, simulation_train_targets, view_texts

    params = config["datasets"][dataset]["params"]
    splits = load_icd10cm_controlled({"train": n_train, "val": 0, "test": n_train // 4},
                                     tuple(params["codes_per_doc"]), params["seed"]).splits
    train, test = splits["train"], splits["test"]
    gold_train, gold_test = [list(x) for x in train["labels"]], [list(x) for x in test["labels"]]
    encoder = SentenceEmbedder(config["embedder"])
    out = {"n_train": len(train), "n_test": len(test), "codes_per_doc": params["codes_per_doc"], "forms": {}}
    for form in TARGET_FORMS:
        y_train, frequency = simulation_train_targets("gold", form, train_teacher=gold_train, train_gold=gold_train)
        y_test = simulation_test_targets("gold", form, frequency, test_teacher=gold_test, test_gold=gold_test,
                                         test_student=gold_test)
        simulator = EmbeddingSimulator(encoder)
        x_train = view_texts(list(train["text"]), [""] * len(train), simulator.truncator)["x"]
        x_test = view_texts(list(test["text"]), [""] * len(test), simulator.truncator)["x"]
        predicted = simulator.fit(x_train, y_train).predict(x_test)
        majority = pd.Series(y_train).value_counts().index[0]
        out["forms"][form] = {"n_classes": len(set(y_train)),
                              "targets_seen_in_training": sum(t in set(y_train) for t in y_test) / len(y_test),
                              "majority_class_acc": sum(t == majority for t in y_test) / len(y_test),
                              "sim_acc_x": sum(p == t for p, t in zip(predicted, y_test)) / len(y_test)}
    return out


def markdown(result: dict, command: str) -> str:
    lines = [f"LAS target forms on `{result['dataset']}` ({result['n_test']} test documents; simulator "
             f"{result['simulator']}, target {result['target']}).", "", f"    {command}", "",
             "| form | model | LAS | acc x | acc x+r | acc r | test targets that are a training class |",
             "|---|---|---|---|---|---|---|"]
    for form, part in result["forms"].items():
        for model, r in part["models"].items():
            lines.append(f"| {form} ({part['n_classes']} classes / {part['n_train']} train) | {model} | "
                         f"{r['las']:+.3f} | {r['sim_acc_x']:.3f} | {r['sim_acc_xr']:.3f} | {r['sim_acc_r']:.3f} | "
                         f"{r['targets_seen_in_training']:.2f} |")
    if "synthetic" in result:
        syn = result["synthetic"]
        lines += ["", f"Gold label sets of the demo's generator, {syn['n_train']} train / {syn['n_test']} test "
                  f"documents (codes per document {syn['codes_per_doc']}), target gold, x-only simulator:", "",
                  "| form | classes | test targets that are a training class | majority-class acc | acc x |",
                  "|---|---|---|---|---|"]
        lines += [f"| {form} | {r['n_classes']} | {r['targets_seen_in_training']:.3f} | {r['majority_class_acc']:.3f} | "
                  f"{r['sim_acc_x']:.3f} |" for form, r in syn["forms"].items()]
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--results", type=Path, required=True, help="a finished run's results/ folder")
    parser.add_argument("--config", type=Path, default=Path("config/config.yaml"))
    parser.add_argument("--synthetic", type=int, default=0, help="also N train vignettes of the demo's generator")
    parser.add_argument("--out", type=Path, default=Path("benchmarks/results/las_target_form"))
    args = parser.parse_args()
    config = load_config(args.config)
    dataset = next(iter(config["datasets"]))
    result = {"results": str(args.results), **compare(config, args.results, dataset)}
    if args.synthetic:
        result["synthetic"] = synthetic(config, dataset, args.synthetic)
    command = (f"PYTHONPATH=. HF_HUB_OFFLINE=1 python benchmarks/las_target_form.py --results {args.results} "
               f"--config {args.config} --out {args.out}" + (f" --synthetic {args.synthetic}" if args.synthetic else ""))
    result["command"] = command
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.with_suffix(".json").write_text(json.dumps(result, indent=1) + "\n")
    args.out.with_suffix(".md").write_text(markdown(result, command))
    print(markdown(result, command))


if __name__ == "__main__":
    main()
