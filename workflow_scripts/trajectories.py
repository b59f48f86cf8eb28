from mechdistill.logutil import rule_logging
from mechdistill.stages import run_trajectories

with rule_logging(snakemake.log[0]):
    run_trajectories(snakemake.config, snakemake.wildcards.model, cot_path=snakemake.input.cot,
                     anchors_path=snakemake.input.anchors, labels_path=snakemake.input.labels,
                     curves_path=snakemake.output.curves, summary_path=snakemake.output.summary)
