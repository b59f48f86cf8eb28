# Behavioural measurements of the two phases: anchors, near-misses, CoT spans; Focus/Confusion.


rule anchors:
    input:
        cot=paths.COT,
        prompts=paths.PROMPTS,
        docs=paths.DATA,
        labels=paths.LABELS,
    output:
        paths.ANCHORS,
    params:
        anchors=canonical(config["anchors"]),
        embedder=config["embedder"],
    wildcard_constraints:
        teacher="|".join(config["models"]),
    log:
        "logs/anchors/{dataset}.{teacher}.{split}.log",
    conda:
        "../envs/cpu.yaml"
    script:
        "../workflow_scripts/anchors.py"


def model_cot(wildcards):
    """The CoT a model wrote on the trajectory split: the teacher's, or a student's predictions."""
    split = config["trajectories"]["split"]
    if wildcards.model == config["teacher"]:
        return paths.COT.format(dataset=wildcards.dataset, teacher=wildcards.model, split=split)
    student, method = wildcards.model.split("/")
    return paths.STUDENT_PRED.format(dataset=wildcards.dataset, student=student, method=method, split=split)


rule trajectories:
    input:
        cot=model_cot,
        anchors=lambda wc: paths.ANCHORS.format(dataset=wc.dataset, teacher=config["teacher"],
                                                split=config["trajectories"]["split"]),
        labels=paths.LABELS,
    output:
        curves=paths.TRAJECTORIES,
        summary=paths.TRAJECTORY_SUMMARY,
    params:
        trajectories=canonical(config["trajectories"]),
        early_tokens=config["anchors"]["early_tokens"],
        embedder=config["embedder"],
    wildcard_constraints:
        model="[^/]+(/[^/]+)?",
    log:
        "logs/trajectories/{dataset}.{model}.log",
    conda:
        "../envs/cpu.yaml"
    script:
        "../workflow_scripts/trajectories.py"


rule figure1:
    input:
        lambda wc: [t for t in group_targets("trajectories", "student_trajectories")
                    if t.startswith(f"{paths.R}/{wc.dataset}/")],
    output:
        report(paths.FIGURE.replace("{figure}", "figure1_{dataset}"), caption="../report/figure1.rst",
               category="Characterize", subcategory="{dataset}"),
    log:
        "logs/figure1/{dataset}.log",
    conda:
        "../envs/cpu.yaml"
    script:
        "../workflow_scripts/figure1.py"
