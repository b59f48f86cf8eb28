# Teacher chains of thought (vLLM on GPU, transformers on CPU, or user traces).

from mechdistill.teacher.settings import GenerationSettings


rule teacher_cot:
    input:
        prompts=paths.prompts(),
        labels=paths.labels(),
        traces=trace_file,
    output:
        paths.cot(),
    params:
        settings=settings_of(GenerationSettings),
        model=lambda wc: canonical(config["models"][wc.teacher]),
    wildcard_constraints:
        teacher=one_of(config["models"]),
    threads: workflow.cores
    resources:
        gpu=generation_gpus,
    log:
        paths.log("teacher_cot", "{dataset}.{teacher}.{split}"),
    conda:
        "../envs/vllm.yaml" if config["generation"]["backend"] == "vllm" else "../envs/cpu.yaml"
    script:
        "../workflow_scripts/teacher_cot.py"
