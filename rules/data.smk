# Datasets, task prompts and the clean-prompt characterization set (CPU).


rule prepare_dataset:
    input:
        raw=raw_dataset_files,
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
    wildcard_constraints:
        split=one_of(paths.SPLITS),
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


rule clean_prompts:
    input:
        source=paths.data(split=config["clean_prompts"]["source_split"]),
        train=paths.data(split="train"),
        labels=paths.labels(),
    output:
        docs=paths.data(),
        prompts=paths.prompts(),
    wildcard_constraints:
        split=paths.CLEAN_SPLIT_PATTERN,
    params:
        clean_prompts=canonical({k: v for k, v in config["clean_prompts"].items() if k not in ("style", "compare_styles")}),
        prompts=lambda wc: canonical(config["prompts"]) if "guided" in wc.split else "",  # guided styles reuse them
        embedder=config["embedder"],
    log:
        paths.log("clean_prompts", "{dataset}.{split}"),
    conda:
        "../envs/cpu.yaml"
    script:
        "../workflow_scripts/clean_prompts.py"
