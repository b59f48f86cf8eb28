from mechdistill.logutil import job_logging
from mechdistill.stages.anchors import run_anchors

if __name__ == "__main__":  # not when a spawned worker (vLLM, torch) re-imports this file
    wc, inp = snakemake.wildcards, snakemake.input
    with job_logging(snakemake.log[0]):
        run_anchors(snakemake.config, wc.dataset, wc.teacher, wc.split, cot_path=inp.cot, prompts_path=inp.prompts,
                    docs_path=inp.docs, labels_path=inp.labels, out_path=snakemake.output[0])
