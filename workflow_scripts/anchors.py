from mechdistill.logutil import rule_logging
from mechdistill.stages import run_anchors

with rule_logging(snakemake.log[0]):
    run_anchors(snakemake.config, snakemake.wildcards.dataset, snakemake.wildcards.teacher,
                cot_path=snakemake.input.cot, prompts_path=snakemake.input.prompts,
                docs_path=snakemake.input.docs, labels_path=snakemake.input.labels, out_path=snakemake.output[0])
