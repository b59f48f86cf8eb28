from mechdistill.logutil import job_logging
from mechdistill.stages.data import run_build_prompts

if __name__ == "__main__":  # not when a spawned worker (vLLM, torch) re-imports this file
    wc, inp = snakemake.wildcards, snakemake.input
    with job_logging(snakemake.log[0]):
        run_build_prompts(snakemake.config, wc.dataset, wc.split, docs_path=inp.docs, train_path=inp.train,
                          labels_path=inp.labels, out_path=snakemake.output[0])
