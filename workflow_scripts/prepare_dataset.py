from mechdistill.logutil import rule_logging
from mechdistill.stages.data import run_prepare_dataset

with rule_logging(snakemake.log[0]):
    run_prepare_dataset(snakemake.config, snakemake.wildcards.dataset)
