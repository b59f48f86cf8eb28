from mechdistill.logutil import job_logging
from mechdistill.stages.evaluate import run_las_simulator

if __name__ == "__main__":  # not when a spawned worker (torch) re-imports this file
    with job_logging(snakemake.log[0]):
        run_las_simulator(snakemake.config, snakemake.wildcards.dataset,
                          inputs={key: snakemake.input[key] for key in snakemake.input.keys()},
                          out_dir=snakemake.output[0])
