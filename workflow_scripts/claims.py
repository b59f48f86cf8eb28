from mechdistill.logutil import rule_logging
from mechdistill.stages.claims import run_claims

with rule_logging(snakemake.log[0]):
    run_claims(snakemake.config, md_path=snakemake.output.md, parquet_path=snakemake.output.parquet)
