from mechdistill.logutil import job_logging
from mechdistill.stages.teacher import run_teacher_cot

if __name__ == "__main__":  # not when a spawned worker (vLLM, torch) re-imports this file
    wc = snakemake.wildcards
    with job_logging(snakemake.log[0]):
        run_teacher_cot(snakemake.config, wc.dataset, wc.split, model=wc.teacher, prompts_path=snakemake.input.prompts,
                        labels_path=snakemake.input.labels, out_path=snakemake.output[0])
