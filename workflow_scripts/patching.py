from mechdistill.logutil import rule_logging
from mechdistill.stages import run_patching

with rule_logging(snakemake.log[0]):
    run_patching(snakemake.config, snakemake.wildcards.phase, docs_path=snakemake.input.docs,
                 prompts_path=snakemake.input.prompts, cot_path=snakemake.input.cot,
                 anchors_path=snakemake.input.anchors, labels_path=snakemake.input.labels,
                 head_scores_path=snakemake.input.scores, summary_path=snakemake.output.summary)
