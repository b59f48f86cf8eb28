from mechdistill.logutil import job_logging
from mechdistill.stages.claims import run_claims

if __name__ == "__main__":  # not when a spawned worker (vLLM, torch) re-imports this file
    with job_logging(snakemake.log[0]):
        run_claims(snakemake.config, md_path=snakemake.output.md, parquet_path=snakemake.output.parquet)
