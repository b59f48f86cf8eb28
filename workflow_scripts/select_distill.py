from mechdistill.logutil import job_logging
from mechdistill.stages.model_free import run_select_distill

if __name__ == "__main__":  # not when a spawned worker (vLLM, torch) re-imports this file
    wc, out = snakemake.wildcards, snakemake.output
    with job_logging(snakemake.log[0]):
        run_select_distill(snakemake.config, wc.dataset, wc.student, wc.method, log_path=out.log,
                           mechanism_path=out.mechanism, selection_path=out.selection,
                           items_path=out.training_items)
