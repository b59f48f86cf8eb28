from mechdistill.logutil import job_logging
from mechdistill.stages.data import run_prepare_dataset

if __name__ == "__main__":  # not when a spawned worker (vLLM, torch) re-imports this file
    with job_logging(snakemake.log[0]):
        run_prepare_dataset(snakemake.config, snakemake.wildcards.dataset)
