from mechdistill.logutil import job_logging
from mechdistill.stages.model_free import run_head_figures

if __name__ == "__main__":  # not when a spawned worker (vLLM, torch) re-imports this file
    inp, out = snakemake.input, snakemake.output
    with job_logging(snakemake.log[0]):
        run_head_figures(snakemake.config, snakemake.wildcards.dataset, coarse_path=inp.coarse, refine_path=inp.refine,
                         example_path=inp.example, figure4_path=out.figure4, figure7_path=out.figure7)
