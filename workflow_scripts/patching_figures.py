from mechdistill.logutil import job_logging
from mechdistill.stages.model_free import run_patching_figure

if __name__ == "__main__":  # not when a spawned worker (vLLM, torch) re-imports this file
    inp, out = snakemake.input, snakemake.output
    with job_logging(snakemake.log[0]):
        for phase, figure in (("phase1", out.figure5), ("phase2", out.figure8)):
            run_patching_figure(snakemake.config, snakemake.wildcards.dataset, phase, summary_path=inp[phase], out_png=figure)
