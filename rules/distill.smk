# Mechanistic distillation: teacher targets, one training job per (student, method), student predictions.


rule teacher_targets:
    input:
        unpack(lambda wc: teacher_split(wc.split)(wc)),
        coarse=paths.head_scores(model="{teacher}", kind="coarse"),
        refine=paths.head_scores(model="{teacher}", kind="refine"),
    output:
        table=paths.targets(),
        tensors=paths.targets_tensors(),
    params:  # what the targets depend on (not the loss weights or training settings)
        distill=canonical({k: config["distill"].get(k) for k in ("top_k", "pools", "teacher_dtype", "max_docs")}),
        tau=config["heads"]["tau"],
        model=lambda wc: canonical(config["models"][wc.teacher]),
    wildcard_constraints:
        teacher=one_of([config["teacher"]]),
        split="train|val",
    threads: workflow.cores
    resources:
        gpu=1,
    log:
        paths.log("teacher_targets", "{dataset}.{teacher}.{split}"),
    conda:
        "../envs/train.yaml"
    script:
        "../workflow_scripts/teacher_targets.py"


rule distill:
    input:
        unpack(teacher_split("train", prefix="train_")),
        unpack(teacher_split("val", prefix="val_")),
        student_coarse=paths.head_scores(model="{student}", kind="coarse"),
        student_refine=paths.head_scores(model="{student}", kind="refine"),
        teacher_coarse=paths.head_scores(model=config["teacher"], kind="coarse"),
        teacher_refine=paths.head_scores(model=config["teacher"], kind="refine"),
        train_targets=paths.targets_tensors(teacher=config["teacher"], split="train"),
        val_targets=paths.targets_tensors(teacher=config["teacher"], split="val"),
    output:
        model=paths.student_model(),
        log=paths.train_log(),
        mechanism=paths.mechanism(),
    params:
        distill=canonical(config["distill"]),
        tau=config["heads"]["tau"],
        method=lambda wc: canonical(config["methods"][wc.method]),
        model=lambda wc: canonical(config["models"][wc.student]),
    wildcard_constraints:
        student=one_of(config["students"]),
        method=one_of(config["methods"]),
    threads: workflow.cores
    resources:
        gpu=1,
    log:
        paths.log("distill", "{dataset}.{student}.{method}"),
    conda:
        "../envs/train.yaml"
    script:
        "../workflow_scripts/distill.py"


rule student_predict:
    input:
        model=paths.student_model(),
        prompts=paths.prompts(),
        labels=paths.labels(),
    output:
        paths.student_pred(),
    params:
        generation=canonical(config["generation"]),
    wildcard_constraints:
        student=one_of(config["students"]),
        method=one_of(config["methods"]),
    threads: workflow.cores
    resources:
        gpu=1,
    log:
        paths.log("student_predict", "{dataset}.{student}.{method}.{split}"),
    conda:
        "../envs/train.yaml"
    script:
        "../workflow_scripts/student_predict.py"
