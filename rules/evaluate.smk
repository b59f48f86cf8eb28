# Evaluation: per-instance metrics of each (student, method); Tables 1-4 and Figure 9.


def evaluate_inputs(wc):
    teacher, dataset = config["teacher"], wc.dataset
    return {
        "pred": paths.student_pred(dataset, wc.student, wc.method, "test"),
        "model": paths.student_model(dataset, wc.student, wc.method),
        "test_docs": paths.data(dataset, "test"),
        "train_docs": paths.data(dataset, "train"),
        "test_prompts": paths.prompts(dataset, "test"),
        "teacher_test_cot": paths.cot(dataset, teacher, "test"),
        "teacher_train_cot": paths.cot(dataset, teacher, "train"),
        "test_anchors": paths.anchors(dataset, teacher, "test"),
        "labels": paths.labels(dataset),
        "trajectory_summary": paths.trajectory_summary(dataset, f"{wc.student}/{wc.method}"),
        "student_coarse": paths.head_scores(dataset, wc.student, "coarse"),
        "student_refine": paths.head_scores(dataset, wc.student, "refine"),
    }


rule evaluate:
    input:
        unpack(evaluate_inputs),
    output:
        paths.metrics(),
    params:
        evaluate=canonical(config["evaluate"]),
        tau=config["heads"]["tau"],
    wildcard_constraints:
        student=one_of(config["students"]),
        method=one_of(config["methods"]),
    threads: workflow.cores
    log:
        paths.log("evaluate", "{dataset}.{student}.{method}"),
    conda:
        "../envs/train.yaml"
    script:
        "../workflow_scripts/evaluate.py"


rule tables:
    input:
        group_targets("evaluate"),
    output:
        [paths.table(t, "md") for t in paths.TABLES],
        [report(paths.table(t, "csv"), caption="../report/tables.rst", category="Tables") for t in paths.TABLES],
        [paths.table(t, "tex") for t in paths.TABLES],
    params:
        evaluate=canonical(config["evaluate"]),
    log:
        paths.log("tables", "tables"),
    conda:
        "../envs/cpu.yaml"
    script:
        "../workflow_scripts/tables.py"


rule figure9:
    input:
        group_targets("evaluate"),
    output:
        report(paths.figure9(), caption="../report/figure9.rst", category="Distill"),
    log:
        paths.log("figure9", "figure9"),
    conda:
        "../envs/cpu.yaml"
    script:
        "../workflow_scripts/figure9.py"


for _table in paths.TABLES:

    rule:  # `snakemake table1` builds just that table (and everything it needs)
        name:
            _table
        input:
            paths.table(_table),
        localrule: True
