from mechdistill.logutil import job_logging
from mechdistill.stages.data import run_clean_prompts

if __name__ == "__main__":  # not when a spawned worker (vLLM, torch) re-imports this file
    wc, inp, out = snakemake.wildcards, snakemake.input, snakemake.output
    with job_logging(snakemake.log[0]):
        run_clean_prompts(snakemake.config, wc.dataset, wc.split, source_path=inp.source, train_path=inp.train,
                          labels_path=inp.labels, docs_path=out.docs, out_path=out.prompts)
