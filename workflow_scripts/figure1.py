from mechdistill.logutil import rule_logging
from mechdistill.stages.anchors import run_figure1

with rule_logging(snakemake.log[0]):
    run_figure1(snakemake.config, snakemake.wildcards.dataset, list(snakemake.input), snakemake.output[0])
