from mechdistill.logutil import job_logging
from mechdistill.paths import SPLIT_FILES
from mechdistill.stages.distill import run_teacher_targets

if __name__ == "__main__":  # not when a spawned worker (vLLM, torch) re-imports this file
    wc, inp, out = snakemake.wildcards, snakemake.input, snakemake.output
    with job_logging(snakemake.log[0]):
        run_teacher_targets(snakemake.config, wc.dataset, wc.split, inputs={k: inp[k] for k in SPLIT_FILES},
                            coarse_path=inp.coarse, refine_path=inp.refine, out_path=out.table, tensors_path=out.tensors)
