# Mechanistic distillation: teacher targets, one training job per (student, method), student predictions.


def split_inputs(split, teacher=None):
    """docs/prompts/cot/anchors/labels of one split (the teacher's CoT and anchors)."""
    return lambda wc: {
        f"{split}_docs": paths.DATA.format(dataset=wc.dataset, split=split),
        f"{split}_prompts": paths.PROMPTS.format(dataset=wc.dataset, split=split),
        f"{split}_cot": paths.COT.format(dataset=wc.dataset, teacher=config["teacher"], split=split),
        f"{split}_anchors": paths.ANCHORS.format(dataset=wc.dataset, teacher=config["teacher"], split=split),
        f"{split}_labels": paths.LABELS.format(dataset=wc.dataset),
    }


def head_tables(model):
    return lambda wc: {f"{'teacher' if model == 'teacher' else 'student'}_{kind}": paths.HEAD_SCORES.format(
        dataset=wc.dataset, model=config["teacher"] if model == "teacher" else wc.student, kind=kind)
        for kind in ("coarse", "refine")}


rule teacher_targets:
    input:
        unpack(lambda wc: split_inputs(wc.split)(wc)),
        unpack(lambda wc: {f"teacher_{kind}": paths.HEAD_SCORES.format(dataset=wc.dataset, model=wc.teacher, kind=kind)
                           for kind in ("coarse", "refine")}),
    output:
        table=paths.TARGETS,
        tensors=paths.TARGETS.replace(".parquet", ".safetensors"),
    params:  # what the targets depend on (not the loss weights or training settings)
        distill=canonical({k: config["distill"].get(k) for k in ("top_k", "pools", "teacher_dtype", "max_docs")}),
        model=lambda wc: canonical(config["models"][wc.teacher]),
    wildcard_constraints:
        teacher=config["teacher"],
        split="train|val",
    threads: workflow.cores
    resources:
        gpu=1,
    log:
        "logs/teacher_targets/{dataset}.{teacher}.{split}.log",
    conda:
        "../envs/train.yaml"
    script:
        "../workflow_scripts/teacher_targets.py"


rule distill:
    input:
        unpack(split_inputs("train")),
        unpack(split_inputs("val")),
        unpack(head_tables("student")),
        unpack(head_tables("teacher")),
        train_targets=lambda wc: paths.TARGETS.format(dataset=wc.dataset, teacher=config["teacher"], split="train"),
        val_targets=lambda wc: paths.TARGETS.format(dataset=wc.dataset, teacher=config["teacher"], split="val"),
    output:
        model=paths.STUDENT_MODEL,
        log=paths.STUDENT_MODEL.replace("model/config.json", "train_log.parquet"),
        mechanism=paths.STUDENT_MODEL.replace("model/config.json", "mechanism.parquet"),
    params:
        distill=canonical(config["distill"]),
        method=lambda wc: canonical(config["methods"][wc.method]),
        model=lambda wc: canonical(config["models"][wc.student]),
    wildcard_constraints:
        student="|".join(config.get("students", [])) or "NO_STUDENT",
        method="|".join(config.get("methods", {})) or "NO_METHOD",
    threads: workflow.cores
    resources:
        gpu=1,
    log:
        "logs/distill/{dataset}.{student}.{method}.log",
    conda:
        "../envs/train.yaml"
    script:
        "../workflow_scripts/distill.py"


rule student_predict:
    input:
        model=paths.STUDENT_MODEL,
        prompts=lambda wc: paths.PROMPTS.format(dataset=wc.dataset, split=wc.split),
        labels=lambda wc: paths.LABELS.format(dataset=wc.dataset),
    output:
        paths.STUDENT_PRED,
    params:
        generation=canonical(config["generation"]),
    wildcard_constraints:
        student="|".join(config.get("students", [])) or "NO_STUDENT",
        method="|".join(config.get("methods", {})) or "NO_METHOD",
    threads: workflow.cores
    resources:
        gpu=1,
    log:
        "logs/student_predict/{dataset}.{student}.{method}.{split}.log",
    conda:
        "../envs/train.yaml"
    script:
        "../workflow_scripts/student_predict.py"
