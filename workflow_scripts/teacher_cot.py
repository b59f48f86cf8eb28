from mechdistill.logutil import rule_logging
from mechdistill.stages import run_teacher_cot

with rule_logging(snakemake.log[0]):
    run_teacher_cot(snakemake.config, snakemake.wildcards.dataset, snakemake.wildcards.split,
                    prompts_path=snakemake.input.prompts, labels_path=snakemake.input.labels,
                    out_path=snakemake.output[0], model=snakemake.wildcards.teacher)
