"""Artifact paths (the contract of DESIGN.md), shared by the Snakefile and the library.

Templates use Snakemake wildcards; `stage_targets(config)` expands them for a config, keyed by
the rule that produces them, so `rule all` can ask for every target of every defined rule and
adding a stage is adding a rule.
"""

from __future__ import annotations

R = "results"
SPLITS = ("train", "val", "test")
PHASES = ("phase1", "phase2")

DATA = R + "/{dataset}/data/{split}.parquet"
LABELS = R + "/{dataset}/data/labels.parquet"
DATA_STATS = R + "/{dataset}/data/stats.json"
PROMPTS = R + "/{dataset}/prompts/{split}.parquet"
COT = R + "/{dataset}/{teacher}/cot/{split}.parquet"
ANCHORS = R + "/{dataset}/{teacher}/anchors/{split}.parquet"
TRAJECTORIES = R + "/{dataset}/{model}/trajectories.parquet"
TRAJECTORY_SUMMARY = R + "/{dataset}/{model}/trajectories_summary.parquet"
HEAD_SCORES = R + "/{dataset}/{model}/heads/{kind}.parquet"
HEAD_EXAMPLE = R + "/{dataset}/{model}/heads/coarse_example.parquet"
PATCHING = R + "/{dataset}/{teacher}/patching/{phase}.parquet"
TARGETS = R + "/{dataset}/{teacher}/targets/{split}.parquet"
STUDENT_MODEL = R + "/{dataset}/{student}/{method}/model/config.json"
STUDENT_PRED = R + "/{dataset}/{student}/{method}/pred/{split}.parquet"
METRICS = R + "/{dataset}/{student}/{method}/metrics.parquet"
TABLE = R + "/tables/{table}.md"
FIGURE = R + "/figures/{figure}.png"
LOG = "logs/{rule}/{name}.log"


def stage_targets(config: dict) -> dict[str, tuple[tuple[str, ...], list[str]]]:
    """target group -> (rules that must all be defined, the concrete files of that group).

    A group is requested by `rule all` once every rule it needs exists; e.g. the students'
    trajectories need both `trajectories` and `student_predict`.
    """
    datasets = list(config["datasets"])
    teacher = config["teacher"]
    students = list(config.get("students", []))
    methods = list(config.get("methods", {}))
    # Students are evaluated per distillation method: their CoT-derived artifacts live under
    # {student}/{method}; `student_models` are the wildcard values of {model} for them.
    student_models = [f"{s}/{m}" for s in students for m in methods]

    def each(template: str, **axes: list[str]) -> list[str]:
        out = [template]
        for key, values in axes.items():
            out = [t.replace("{" + key + "}", v) for t in out for v in values]
        return out

    return {
        "prepare_dataset": (("prepare_dataset",), each(DATA, dataset=datasets, split=list(SPLITS))
                            + each(LABELS, dataset=datasets)),
        "build_prompts": (("build_prompts",), each(PROMPTS, dataset=datasets, split=list(SPLITS))),
        "teacher_cot": (("teacher_cot",), each(COT, dataset=datasets, teacher=[teacher], split=list(SPLITS))),
        "anchors": (("anchors",), each(ANCHORS, dataset=datasets, teacher=[teacher], split=list(SPLITS))),
        "trajectories": (("trajectories",), each(TRAJECTORIES, dataset=datasets, model=[teacher])),
        "student_trajectories": (("trajectories", "student_predict"),
                                 each(TRAJECTORIES, dataset=datasets, model=student_models)),
        "head_scores": (("head_scores",), each(HEAD_SCORES, dataset=datasets, model=[teacher] + students,
                                                kind=["coarse", "refine"])),
        "patching": (("patching",), each(PATCHING, dataset=datasets, teacher=[teacher], phase=list(PHASES))),
        "teacher_targets": (("teacher_targets",), each(TARGETS, dataset=datasets, teacher=[teacher], split=["train", "val"])),
        "distill": (("distill",), each(STUDENT_MODEL, dataset=datasets, student=students, method=methods)),
        "student_predict": (("student_predict",), each(STUDENT_PRED, dataset=datasets, student=students,
                                                       method=methods, split=["test"])),
        "evaluate": (("evaluate",), each(METRICS, dataset=datasets, student=students, method=methods)),
        "figure1": (("figure1",), each(FIGURE, figure=[f"figure1_{d}" for d in datasets])),
        "head_figures": (("head_figures",), each(FIGURE, figure=[f"figure{n}_{d}" for n in (4, 7) for d in datasets])),
        "patching_figures": (("patching_figures",),
                             each(FIGURE, figure=[f"figure{n}_{d}" for n in (5, 8) for d in datasets])),
        "tables": (("tables",), each(TABLE, table=["table1", "table2", "table3", "table4"])),
        "figure9": (("figure9",), each(FIGURE, figure=["figure9"])),
    }
