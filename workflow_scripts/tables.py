from mechdistill.logutil import rule_logging
from mechdistill.stages.evaluate import run_tables

with rule_logging(snakemake.log[0]):
    run_tables(snakemake.config, list(snakemake.input.metrics), list(snakemake.input.selections))
