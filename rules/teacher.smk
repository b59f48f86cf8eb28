# Teacher chains of thought (vLLM on GPU, transformers on CPU, or user traces).


rule teacher_cot:
    input:
        prompts=paths.prompts(),
        labels=paths.labels(),
        traces=trace_file,
    output:
        paths.cot(),
    params:
        generation=canonical(config["generation"]),
        model=lambda wc: canonical(config["models"][wc.teacher]),
    wildcard_constraints:
        teacher=one_of(config["models"]),
    threads: workflow.cores
    resources:
        gpu=lambda wc: config["generation"]["tensor_parallel_size"] if config["generation"]["backend"] == "vllm" else 0,
    log:
        paths.log("teacher_cot", "{dataset}.{teacher}.{split}"),
    conda:
        "../envs/vllm.yaml" if config["generation"]["backend"] == "vllm" else "../envs/cpu.yaml"
    script:
        "../workflow_scripts/teacher_cot.py"
