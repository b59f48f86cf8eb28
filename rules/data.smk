# Datasets and prompts (CPU).


rule prepare_dataset:
    output:
        data=expand(paths.DATA, split=paths.SPLITS, allow_missing=True),
        labels=paths.LABELS,
    params:
        entry=lambda wc: canonical({k: v for k, v in config["datasets"][wc.dataset].items() if k != "candidates"}),
        seed=config["seed"],
    log:
        "logs/prepare_dataset/{dataset}.log",
    conda:
        "../envs/cpu.yaml"
    script:
        "../workflow_scripts/prepare_dataset.py"


rule build_prompts:
    input:
        docs=paths.DATA,
        train=lambda wc: paths.DATA.format(dataset=wc.dataset, split="train"),
        labels=paths.LABELS,
    output:
        paths.PROMPTS,
    params:
        candidates=lambda wc: canonical(config["datasets"][wc.dataset]["candidates"]),
        prompts=canonical(config["prompts"]),
        embedder=config["embedder"],
    log:
        "logs/build_prompts/{dataset}.{split}.log",
    conda:
        "../envs/cpu.yaml"
    script:
        "../workflow_scripts/build_prompts.py"
