# Head characterization: CoarseScore / RefineScore of every head, and Figures 4 and 7.


def heads_input(name):
    split = config["heads"]["split"]
    return lambda wc: {
        "cot": paths.COT.format(dataset=wc.dataset, teacher=config["teacher"], split=split),
        "anchors": paths.ANCHORS.format(dataset=wc.dataset, teacher=config["teacher"], split=split),
        "prompts": paths.PROMPTS.format(dataset=wc.dataset, split=split),
        "docs": paths.DATA.format(dataset=wc.dataset, split=split),
        "labels": paths.LABELS.format(dataset=wc.dataset),
    }[name]


rule head_scores:
    input:
        cot=heads_input("cot"),
        anchors=heads_input("anchors"),
        prompts=heads_input("prompts"),
        docs=heads_input("docs"),
        labels=heads_input("labels"),
    output:
        coarse=paths.HEAD_SCORES.replace("{kind}", "coarse"),
        refine=paths.HEAD_SCORES.replace("{kind}", "refine"),
        example=paths.HEAD_EXAMPLE,
    params:
        heads=canonical(config["heads"]),
        model=lambda wc: canonical(config["models"][wc.model]),
    wildcard_constraints:
        model="|".join(config["models"]),
    threads: workflow.cores
    log:
        "logs/head_scores/{dataset}.{model}.log",
    conda:
        "../envs/train.yaml"
    script:
        "../workflow_scripts/head_scores.py"


rule head_figures:
    input:
        coarse=paths.HEAD_SCORES.replace("{model}", config["teacher"]).replace("{kind}", "coarse"),
        refine=paths.HEAD_SCORES.replace("{model}", config["teacher"]).replace("{kind}", "refine"),
        example=paths.HEAD_EXAMPLE.replace("{model}", config["teacher"]),
    output:
        figure4=report(paths.FIGURE.replace("{figure}", "figure4_{dataset}"), caption="../report/head_figures.rst",
                       category="Characterize", subcategory="{dataset}"),
        figure7=report(paths.FIGURE.replace("{figure}", "figure7_{dataset}"), caption="../report/head_figures.rst",
                       category="Characterize", subcategory="{dataset}"),
    params:
        top_k=config["heads"]["top_k"],
    log:
        "logs/head_figures/{dataset}.log",
    conda:
        "../envs/cpu.yaml"
    script:
        "../workflow_scripts/head_figures.py"
