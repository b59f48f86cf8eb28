from mechdistill.evaluate.stages import run_figure9
from mechdistill.logutil import rule_logging

with rule_logging(snakemake.log[0]):
    run_figure9(snakemake.config, list(snakemake.input), snakemake.output[0])
