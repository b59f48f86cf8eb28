from mechdistill.logutil import rule_logging
from mechdistill.stages.model_free import run_model_card

if __name__ == "__main__":  # not when a spawned worker (vLLM, torch) re-imports this file
    wc, inp = snakemake.wildcards, snakemake.input
    with rule_logging(snakemake.log[0]):
        run_model_card(snakemake.config, wc.dataset, wc.student, wc.method, selection_path=inp.selection,
                       metrics_path=inp.metrics)
