from mechdistill.logutil import job_logging
from mechdistill.stages.anchors import run_trajectories

if __name__ == "__main__":  # not when a spawned worker (vLLM, torch) re-imports this file
    wc, inp, out = snakemake.wildcards, snakemake.input, snakemake.output
    with job_logging(snakemake.log[0]):
        run_trajectories(snakemake.config, wc.dataset, wc.model, cot_path=inp.cot, anchors_path=inp.anchors,
                         labels_path=inp.labels, curves_path=out.curves, summary_path=out.summary)
