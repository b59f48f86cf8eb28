# Activation patching of the teacher (Figs 5 and 8): denoising / noising of attention patterns of
# cumulative bins of top-ranked heads vs count-matched random and lowest-ranked heads.

PATCHING_SCORES = {"phase1": "coarse", "phase2": "refine"}


def patching_input(name):
    split = config["patching"]["split"]
    return lambda wc: {
        "docs": paths.DATA.format(dataset=wc.dataset, split=split),
        "prompts": paths.PROMPTS.format(dataset=wc.dataset, split=split),
        "cot": paths.COT.format(dataset=wc.dataset, teacher=wc.teacher, split=split),
        "anchors": paths.ANCHORS.format(dataset=wc.dataset, teacher=wc.teacher, split=split),
        "labels": paths.LABELS.format(dataset=wc.dataset),
        "scores": paths.HEAD_SCORES.format(dataset=wc.dataset, model=wc.teacher, kind=PATCHING_SCORES[wc.phase]),
    }[name]


rule patching:
    input:
        docs=patching_input("docs"),
        prompts=patching_input("prompts"),
        cot=patching_input("cot"),
        anchors=patching_input("anchors"),
        labels=patching_input("labels"),
        scores=patching_input("scores"),
    output:
        summary=paths.PATCHING,
        runs=paths.PATCHING.replace("{phase}.parquet", "{phase}_runs.parquet"),
        pairs=paths.PATCHING.replace("{phase}.parquet", "{phase}_pairs.parquet"),
    params:
        patching=canonical(config["patching"]),
        anchors=canonical(config["anchors"]),
        model=lambda wc: canonical(config["models"][wc.teacher]),
    wildcard_constraints:
        phase="phase1|phase2",
        teacher=config["teacher"],
    threads: workflow.cores
    resources:
        gpu=1,
    log:
        "logs/patching/{dataset}.{teacher}.{phase}.log",
    conda:
        "../envs/train.yaml"
    script:
        "../workflow_scripts/patching.py"


rule patching_figures:
    input:
        phase1=paths.PATCHING.replace("{teacher}", config["teacher"]).replace("{phase}", "phase1"),
        phase2=paths.PATCHING.replace("{teacher}", config["teacher"]).replace("{phase}", "phase2"),
    output:
        figure5=report(paths.FIGURE.replace("{figure}", "figure5_{dataset}"), caption="../report/patching.rst",
                       category="Patching", subcategory="{dataset}"),
        figure8=report(paths.FIGURE.replace("{figure}", "figure8_{dataset}"), caption="../report/patching.rst",
                       category="Patching", subcategory="{dataset}"),
    log:
        "logs/patching_figures/{dataset}.log",
    conda:
        "../envs/cpu.yaml"
    script:
        "../workflow_scripts/patching_figures.py"
