from mechdistill.distill.stages import run_teacher_targets
from mechdistill.logutil import rule_logging

split = snakemake.wildcards.split
with rule_logging(snakemake.log[0]):
    run_teacher_targets(snakemake.config, *(snakemake.input[f"{split}_{k}"] for k in ("docs", "prompts", "cot",
                                                                                       "anchors", "labels")),
                        coarse_path=snakemake.input.teacher_coarse, refine_path=snakemake.input.teacher_refine,
                        out_path=snakemake.output.table)
