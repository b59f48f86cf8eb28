from mechdistill.logutil import rule_logging
from mechdistill.paths import SPLIT_FILES
from mechdistill.stages.distill import run_baseline_teacher_data

wc, inp = snakemake.wildcards, snakemake.input
with rule_logging(snakemake.log[0]):
    run_baseline_teacher_data(snakemake.config, wc.dataset, wc.method, wc.split,
                              inputs={k: inp[k] for k in SPLIT_FILES}, out_path=snakemake.output[0])
