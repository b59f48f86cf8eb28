# Head characterization: CoarseScore / RefineScore of every head (on the clean-prompt set by default,
# and on further prompt styles for comparison), the comparison table, and Figures 4 and 7.

from mechdistill.characterize.settings import HeadComparisonSettings, HeadFigureSettings, HeadSettings


rule head_scores:
    input:
        unpack(teacher_split(config["heads"]["split"])),
    output:
        coarse=paths.head_scores(kind="coarse"),
        refine=paths.head_scores(kind="refine"),
        example=paths.head_example(),
    params:
        settings=settings_of(HeadSettings),
        model=lambda wc: canonical(config["models"][wc.model]),
    wildcard_constraints:
        model=one_of(config["models"]),
    threads: workflow.cores
    log:
        paths.log("head_scores", "{dataset}.{model}"),
    conda:
        "../envs/train.yaml"
    script:
        "../workflow_scripts/head_scores.py"


rule style_head_scores:
    input:
        unpack(lambda wc: paths.split_files(wc.dataset, config["teacher"], wc.split)),
    output:
        coarse=paths.style_head_scores(kind="coarse"),
        refine=paths.style_head_scores(kind="refine"),
    params:
        settings=settings_of(HeadSettings),
        model=lambda wc: canonical(config["models"][wc.model]),
    wildcard_constraints:
        model=one_of([config["teacher"]]),
        split=paths.CLEAN_SPLIT_PATTERN,
    threads: workflow.cores
    log:
        paths.log("head_scores", "{dataset}.{model}.{split}"),
    conda:
        "../envs/train.yaml"
    script:
        "../workflow_scripts/head_scores.py"


rule head_comparison:
    input:
        coarse=paths.head_scores(model=config["teacher"], kind="coarse"),
        refine=paths.head_scores(model=config["teacher"], kind="refine"),
        styles=lambda wc: [paths.style_head_scores(wc.dataset, config["teacher"], s, k)
                           for s in paths.compared_splits(config) for k in paths.HEAD_SCORE_KINDS],
    output:
        md=paths.head_comparison(fmt="md"),
        parquet=paths.head_comparison(fmt="parquet"),
    params:
        settings=settings_of(HeadComparisonSettings),
    wildcard_constraints:
        teacher=one_of([config["teacher"]]),
    log:
        paths.log("head_comparison", "{dataset}.{teacher}"),
    conda:
        "../envs/cpu.yaml"
    script:
        "../workflow_scripts/head_comparison.py"


rule head_figures:
    input:
        coarse=paths.head_scores(model=config["teacher"], kind="coarse"),
        refine=paths.head_scores(model=config["teacher"], kind="refine"),
        example=paths.head_example(model=config["teacher"]),
    output:
        figure4=report(paths.head_figure(4), caption="../report/head_figures.rst", category="Characterize",
                       subcategory="{dataset}"),
        figure7=report(paths.head_figure(7), caption="../report/head_figures.rst", category="Characterize",
                       subcategory="{dataset}"),
    params:
        settings=settings_of(HeadFigureSettings),
    log:
        paths.log("head_figures", "{dataset}"),
    conda:
        "../envs/cpu.yaml"
    script:
        "../workflow_scripts/head_figures.py"
