# Evaluation: per-instance metrics of each (student, method); Tables 1-4 and Figure 9.


def evaluate_inputs(wc):
    teacher = config["teacher"]
    traj_split = config["trajectories"]["split"]
    return {
        "pred": paths.STUDENT_PRED.format(dataset=wc.dataset, student=wc.student, method=wc.method, split="test"),
        "model": paths.STUDENT_MODEL.format(dataset=wc.dataset, student=wc.student, method=wc.method),
        "test_docs": paths.DATA.format(dataset=wc.dataset, split="test"),
        "train_docs": paths.DATA.format(dataset=wc.dataset, split="train"),
        "test_prompts": paths.PROMPTS.format(dataset=wc.dataset, split="test"),
        "teacher_test_cot": paths.COT.format(dataset=wc.dataset, teacher=teacher, split="test"),
        "teacher_train_cot": paths.COT.format(dataset=wc.dataset, teacher=teacher, split="train"),
        "test_anchors": paths.ANCHORS.format(dataset=wc.dataset, teacher=teacher, split="test"),
        "labels": paths.LABELS.format(dataset=wc.dataset),
        "trajectory_summary": paths.TRAJECTORY_SUMMARY.format(dataset=wc.dataset, model=f"{wc.student}/{wc.method}"),
        "student_coarse": paths.HEAD_SCORES.format(dataset=wc.dataset, model=wc.student, kind="coarse"),
        "student_refine": paths.HEAD_SCORES.format(dataset=wc.dataset, model=wc.student, kind="refine"),
    }


rule evaluate:
    input:
        unpack(evaluate_inputs),
    output:
        paths.METRICS,
    params:
        evaluate=canonical(config["evaluate"]),
    wildcard_constraints:
        student="|".join(config.get("students", [])) or "NO_STUDENT",
        method="|".join(config.get("methods", {})) or "NO_METHOD",
    threads: workflow.cores
    log:
        "logs/evaluate/{dataset}.{student}.{method}.log",
    conda:
        "../envs/train.yaml"
    script:
        "../workflow_scripts/evaluate.py"


rule tables:
    input:
        group_targets("evaluate"),
    output:
        [paths.TABLE.replace("{table}", t) for t in ("table1", "table2", "table3", "table4")],
        [report(paths.TABLE.replace("{table}", t).replace(".md", ".csv"), caption="../report/tables.rst",
                category="Tables") for t in ("table1", "table2", "table3", "table4")],
    params:
        evaluate=canonical(config["evaluate"]),
    log:
        "logs/tables/tables.log",
    conda:
        "../envs/cpu.yaml"
    script:
        "../workflow_scripts/tables.py"


rule figure9:
    input:
        group_targets("evaluate"),
    output:
        report(paths.FIGURE.replace("{figure}", "figure9"), caption="../report/figure9.rst", category="Distill"),
    log:
        "logs/figure9/figure9.log",
    conda:
        "../envs/cpu.yaml"
    script:
        "../workflow_scripts/figure9.py"


for _table in ("table1", "table2", "table3", "table4"):

    rule:  # `snakemake table1` builds just that table (and everything it needs)
        name:
            _table
        input:
            paths.TABLE.replace("{table}", _table),
        localrule: True
