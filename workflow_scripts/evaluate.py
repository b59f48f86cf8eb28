from pathlib import Path

from mechdistill.evaluate.stages import run_evaluate
from mechdistill.logutil import rule_logging

wc = snakemake.wildcards
paths = {key: snakemake.input[key] for key in snakemake.input.keys()}
paths["model"] = str(Path(paths["model"]).parent)
with rule_logging(snakemake.log[0]):
    run_evaluate(snakemake.config, wc.dataset, wc.student, wc.method, paths, snakemake.output[0])
