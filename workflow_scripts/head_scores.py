from mechdistill.logutil import rule_logging
from mechdistill.stages import run_head_scores

with rule_logging(snakemake.log[0]):
    run_head_scores(snakemake.config, snakemake.wildcards.model, cot_path=snakemake.input.cot,
                    anchors_path=snakemake.input.anchors, prompts_path=snakemake.input.prompts,
                    docs_path=snakemake.input.docs, labels_path=snakemake.input.labels,
                    coarse_path=snakemake.output.coarse, refine_path=snakemake.output.refine,
                    example_path=snakemake.output.example)
