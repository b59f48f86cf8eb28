# Datasets and prompts (CPU).


rule prepare_dataset:
    output:
        data=[paths.data(split=split) for split in paths.SPLITS],
        labels=paths.labels(),
    params:
        entry=lambda wc: canonical({k: v for k, v in config["datasets"][wc.dataset].items() if k != "candidates"}),
        seed=config["seed"],
    log:
        paths.log("prepare_dataset", "{dataset}"),
    conda:
        "../envs/cpu.yaml"
    script:
        "../workflow_scripts/prepare_dataset.py"


rule build_prompts:
    input:
        docs=paths.data(),
        train=paths.data(split="train"),
        labels=paths.labels(),
    output:
        paths.prompts(),
    params:
        candidates=lambda wc: canonical(config["datasets"][wc.dataset]["candidates"]),
        prompts=canonical(config["prompts"]),
        embedder=config["embedder"],
    log:
        paths.log("build_prompts", "{dataset}.{split}"),
    conda:
        "../envs/cpu.yaml"
    script:
        "../workflow_scripts/build_prompts.py"
