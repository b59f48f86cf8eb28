from mechdistill.logutil import job_logging
from mechdistill.stages.evaluate import run_evaluate

if __name__ == "__main__":  # not when a spawned worker (vLLM, torch) re-imports this file
    wc = snakemake.wildcards
    inputs = {key: snakemake.input[key] for key in snakemake.input.keys()}
    with job_logging(snakemake.log[0]):
        run_evaluate(snakemake.config, wc.dataset, wc.student, wc.method, inputs=inputs, out_path=snakemake.output[0])
