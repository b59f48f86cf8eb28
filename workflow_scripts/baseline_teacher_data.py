from mechdistill.logutil import job_logging
from mechdistill.paths import SPLIT_FILES
from mechdistill.stages.distill import run_baseline_teacher_data

if __name__ == "__main__":  # not when a spawned worker (vLLM, torch) re-imports this file
    inp, out = snakemake.input, snakemake.output
    with job_logging(snakemake.log[0]):
        run_baseline_teacher_data(snakemake.config, snakemake.wildcards.dataset, snakemake.wildcards.method,
                                  inputs={split: {k: inp[f"{split}_{k}"] for k in SPLIT_FILES} for split in ("train", "val")},
                                  out_paths={"train": out.train, "val": out.val})
