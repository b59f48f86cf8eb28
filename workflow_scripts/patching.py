from mechdistill.logutil import rule_logging
from mechdistill.stages.patching import run_patching

wc, inp, out = snakemake.wildcards, snakemake.input, snakemake.output
with rule_logging(snakemake.log[0]):
    run_patching(snakemake.config, wc.dataset, wc.phase, docs_path=inp.docs, prompts_path=inp.prompts,
                 cot_path=inp.cot, anchors_path=inp.anchors, labels_path=inp.labels, head_scores_path=inp.scores,
                 summary_path=out.summary, runs_path=out.runs, pairs_path=out.pairs)
