# Datasets, task prompts and the clean-prompt characterization set (CPU).

from mechdistill.data.settings import DatasetSettings
from mechdistill.teacher.settings import CandidateSettings, CleanPromptSettings


rule prepare_dataset:
    input:
        raw=raw_dataset_files,
    output:
        data=[paths.data(split=split) for split in paths.SPLITS],
        labels=paths.labels(),
    params:
        settings=settings_of(DatasetSettings),
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
        settings=settings_of(CandidateSettings),
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
        settings=settings_of(CleanPromptSettings),
    log:
        paths.log("clean_prompts", "{dataset}.{split}"),
    conda:
        "../envs/cpu.yaml"
    script:
        "../workflow_scripts/clean_prompts.py"
