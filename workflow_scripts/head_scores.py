from mechdistill.logutil import rule_logging
from mechdistill.stages.characterize import run_head_scores

wc, inp, out = snakemake.wildcards, snakemake.input, snakemake.output
with rule_logging(snakemake.log[0]):
    run_head_scores(snakemake.config, wc.dataset, wc.model, docs_path=inp.docs, prompts_path=inp.prompts,
                    cot_path=inp.cot, anchors_path=inp.anchors, labels_path=inp.labels, coarse_path=out.coarse,
                    refine_path=out.refine, example_path=out.example)
