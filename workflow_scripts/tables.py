from pathlib import Path

from mechdistill.evaluate.stages import run_tables
from mechdistill.logutil import rule_logging

with rule_logging(snakemake.log[0]):
    run_tables(snakemake.config, list(snakemake.input), Path(snakemake.output[0]).parent)
