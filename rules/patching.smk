# Activation patching of the teacher (Figs 5 and 8): denoising / noising of attention patterns of
# cumulative bins of top-ranked heads vs count-matched near-zero-score, most negative-score and random heads.

from mechdistill.patching.settings import PatchingSettings


rule patching:
    input:
        unpack(teacher_split(config["patching"]["split"])),
        scores=lambda wc: paths.head_scores(wc.dataset, wc.teacher, paths.PATCHING_SCORES[wc.phase]),
    output:
        summary=paths.patching(),
        runs=paths.patching_runs(),
        pairs=paths.patching_pairs(),
    params:
        settings=settings_of(PatchingSettings),
        model=lambda wc: canonical(config["models"][wc.teacher]),
    wildcard_constraints:
        phase=one_of(paths.PHASES),
        teacher=one_of([config["teacher"]]),
    threads: workflow.cores
    resources:
        gpu=1,
    log:
        paths.log("patching", "{dataset}.{teacher}.{phase}"),
    conda:
        "../envs/train.yaml"
    script:
        "../workflow_scripts/patching.py"


rule patching_figures:
    input:
        phase1=paths.patching(teacher=config["teacher"], phase="phase1"),
        phase2=paths.patching(teacher=config["teacher"], phase="phase2"),
    output:
        figure5=report(paths.patching_figure("phase1"), caption="../report/patching.rst", category="Patching",
                       subcategory="{dataset}"),
        figure8=report(paths.patching_figure("phase2"), caption="../report/patching.rst", category="Patching",
                       subcategory="{dataset}"),
    log:
        paths.log("patching_figures", "{dataset}"),
    conda:
        "../envs/cpu.yaml"
    script:
        "../workflow_scripts/patching_figures.py"
