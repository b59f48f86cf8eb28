from mechdistill.logutil import job_logging
from mechdistill.stages.model_free import run_figure9

if __name__ == "__main__":  # not when a spawned worker (vLLM, torch) re-imports this file
    with job_logging(snakemake.log[0]):
        run_figure9(snakemake.config, list(snakemake.input), snakemake.output[0])
