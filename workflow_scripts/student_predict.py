from mechdistill.logutil import job_logging
from mechdistill.stages.distill import run_student_predict

if __name__ == "__main__":  # not when a spawned worker (vLLM, torch) re-imports this file
    wc, inp = snakemake.wildcards, snakemake.input
    with job_logging(snakemake.log[0]):
        run_student_predict(snakemake.config, wc.dataset, wc.student, wc.method, prompts_path=inp.prompts,
                            labels_path=inp.labels, selection_path=inp.selection,
                            out_path=snakemake.output[0])
