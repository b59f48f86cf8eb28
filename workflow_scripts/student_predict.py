from pathlib import Path

from mechdistill.distill.stages import run_student_predict
from mechdistill.logutil import rule_logging

wc = snakemake.wildcards
with rule_logging(snakemake.log[0]):
    run_student_predict(snakemake.config, wc.dataset, wc.student, wc.method, Path(snakemake.input.model).parent,
                        snakemake.input.prompts, snakemake.input.labels, snakemake.output[0])
