from pathlib import Path

from mechdistill.logutil import rule_logging
from mechdistill.stages import run_build_prompts

with rule_logging(snakemake.log[0]):
    run_build_prompts(snakemake.config, snakemake.wildcards.dataset, snakemake.wildcards.split,
                      data_dir=Path(snakemake.input.labels).parent, out_path=snakemake.output[0])
