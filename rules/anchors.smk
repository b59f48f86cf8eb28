# Behavioural measurements of the two phases: anchors, near-misses, CoT spans; Focus/Confusion.

from mechdistill.anchors.settings import AnchorSettings, TrajectorySettings


rule anchors:
    input:
        cot=paths.cot(),
        prompts=paths.prompts(),
        docs=paths.data(),
        labels=paths.labels(),
    output:
        paths.anchors(),
    params:
        settings=settings_of(AnchorSettings),
        model=lambda wc: canonical(config["models"][wc.teacher]),  # its tokenizer defines the early window
    wildcard_constraints:
        teacher=one_of(config["models"]),
    log:
        paths.log("anchors", "{dataset}.{teacher}.{split}"),
    conda:
        "../envs/cpu.yaml"
    script:
        "../workflow_scripts/anchors.py"


rule trajectories:
    input:
        cot=lambda wc: paths.model_cot(config, wc.dataset, wc.model),
        anchors=lambda wc: paths.anchors(wc.dataset, config["teacher"], config["trajectories"]["split"]),
        labels=paths.labels(),
    output:
        curves=paths.trajectories(),
        summary=paths.trajectory_summary(),
    params:
        settings=settings_of(TrajectorySettings),
        model=lambda wc: canonical(config["models"][wc.model.split("/")[0]]),  # its tokenizer cuts the units
        teacher=lambda wc: canonical(config["models"][config["teacher"]]),  # its tokenizer defines the early window
    wildcard_constraints:
        model="[^/]+(/[^/]+)?",
    log:
        paths.log("trajectories", "{dataset}.{model}"),
    conda:
        "../envs/cpu.yaml"
    script:
        "../workflow_scripts/trajectories.py"


rule figure1:
    input:
        lambda wc: [paths.trajectories(wc.dataset, model) for model in [config["teacher"]] + paths.student_models(config)
                    if paths.trajectories(wc.dataset, model) in group_targets("trajectories", "student_trajectories")],
    output:
        report(paths.figure1(), caption="../report/figure1.rst", category="Characterize", subcategory="{dataset}"),
    log:
        paths.log("figure1", "{dataset}"),
    conda:
        "../envs/cpu.yaml"
    script:
        "../workflow_scripts/figure1.py"
