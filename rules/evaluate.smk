# Evaluation: each dataset's LAS simulators (trained once), per-instance metrics of each (student, method); Tables 1-4 and Figure 9.

from mechdistill.distill.settings import CardSettings
from mechdistill.evaluate.settings import EvaluateSettings, LasSimulatorSettings, RunSettings


rule las_simulator:  # once per dataset: every evaluate job of the dataset reads these simulators
    input:
        train_docs=paths.data(split="train"),
        teacher_train_cot=lambda wc: paths.cot(wc.dataset, config["teacher"], "train"),
    output:
        directory(paths.las_simulator()),
    params:
        settings=settings_of(LasSimulatorSettings),
    threads: workflow.cores
    resources:  # a seq2seq simulator fine-tunes on a GPU; the embedding ones run on the CPU
        gpu=1 if config["evaluate"]["las"]["simulator"] == "seq2seq" else 0,
    log:
        paths.log("las_simulator", "{dataset}"),
    conda:
        "../envs/train.yaml"
    script:
        "../workflow_scripts/las_simulator.py"


rule evaluate:
    input:
        unpack(lambda wc: paths.evaluate_inputs(config, wc.dataset, wc.student, wc.method)),
    output:
        paths.metrics(),
    params:
        settings=settings_of(EvaluateSettings),
    wildcard_constraints:  # the distilled students, and the teacher's own row (method "teacher")
        student=one_of(config["students"] + [config["teacher"]]),
        method=one_of(list(config["methods"]) + [paths.TEACHER_METHOD]),
    threads: workflow.cores
    resources:  # the teacher's own row runs the teacher (as many GPUs as vLLM gives it); a student fits one
        gpu=lambda wc: config["generation"]["tensor_parallel_size"] if wc.method == paths.TEACHER_METHOD else 1,
    log:
        paths.log("evaluate", "{dataset}.{student}.{method}"),
    conda:
        "../envs/train.yaml"
    script:
        "../workflow_scripts/evaluate.py"


rule model_card:  # the published student's card (select_distill wrote it without metrics) with its test metrics
    input:
        model=paths.student_model(),
        selection=paths.selection(),
        metrics=paths.metrics(),
        training_items=paths.training_items(),
        log=paths.train_log(),
    output:
        paths.model_card(),
    params:
        settings=settings_of(CardSettings),
    wildcard_constraints:
        student=one_of(config["students"]),
        method=one_of(config["methods"]),
    localrule: True
    log:
        paths.log("model_card", "{dataset}.{student}.{method}"),
    conda:
        "../envs/cpu.yaml"
    script:
        "../workflow_scripts/model_card.py"


rule tables:
    input:
        metrics=group_targets("evaluate"),
        selections=[paths.selection(d, s, m) for d in config["datasets"]
                    for s, m in paths.distilled_pairs(config)],  # the captions say which grid point and step were kept
    output:
        [paths.table(t, "md") for t in paths.TABLES],
        [report(paths.table(t, "csv"), caption="../report/tables.rst", category="Tables") for t in paths.TABLES],
        [paths.table(t, "tex") for t in paths.TABLES],
    params:
        settings=settings_of(RunSettings),
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
    params:
        settings=settings_of(RunSettings),
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
