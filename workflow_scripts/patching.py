from mechdistill.logutil import job_logging
from mechdistill.paths import SPLIT_FILES
from mechdistill.stages.patching import run_patching

if __name__ == "__main__":  # not when a spawned worker (vLLM, torch) re-imports this file
    wc, inp, out = snakemake.wildcards, snakemake.input, snakemake.output
    with job_logging(snakemake.log[0]):
        run_patching(snakemake.config, wc.dataset, wc.phase, inputs={k: inp[k] for k in SPLIT_FILES},
                     head_scores_path=inp.scores, summary_path=out.summary, runs_path=out.runs, pairs_path=out.pairs)
