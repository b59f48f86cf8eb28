from mechdistill.logutil import rule_logging
from mechdistill.stages import run_patching_figure

with rule_logging(snakemake.log[0]):
    for phase, figure in (("phase1", snakemake.output.figure5), ("phase2", snakemake.output.figure8)):
        run_patching_figure(snakemake.config, snakemake.wildcards.dataset, phase, snakemake.input[phase], figure)
