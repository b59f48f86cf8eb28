from mechdistill.logutil import rule_logging
from mechdistill.stages import run_head_figures

with rule_logging(snakemake.log[0]):
    run_head_figures(snakemake.config, snakemake.wildcards.dataset, snakemake.input.coarse, snakemake.input.refine,
                     snakemake.input.example, snakemake.output.figure4, snakemake.output.figure7)
