# Teacher chains of thought (vLLM on GPU, transformers on CPU, or user traces).


rule teacher_cot:
    input:
        prompts=paths.PROMPTS,
        labels=paths.LABELS,
    output:
        paths.COT,
    params:
        generation=canonical(config["generation"]),
        model=lambda wc: canonical(config["models"][wc.teacher]),
    wildcard_constraints:
        teacher="|".join(config["models"]),
    threads: workflow.cores
    resources:
        gpu=lambda wc: config["generation"]["tensor_parallel_size"] if config["generation"]["backend"] == "vllm" else 0,
    log:
        "logs/teacher_cot/{dataset}.{teacher}.{split}.log",
    conda:
        "../envs/vllm.yaml" if config["generation"]["backend"] == "vllm" else "../envs/cpu.yaml"
    script:
        "../workflow_scripts/teacher_cot.py"
