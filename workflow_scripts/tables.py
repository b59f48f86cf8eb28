from mechdistill.logutil import job_logging
from mechdistill.stages.model_free import run_tables

if __name__ == "__main__":  # not when a spawned worker (vLLM, torch) re-imports this file
    with job_logging(snakemake.log[0]):
        run_tables(snakemake.config, list(snakemake.input.metrics), list(snakemake.input.selections))
