from pathlib import Path

from mechdistill.distill.stages import run_distill
from mechdistill.logutil import rule_logging

inp = snakemake.input
paths = {key: inp[key] for key in ("train_targets", "val_targets", "student_coarse", "student_refine",
                                   "teacher_coarse", "teacher_refine")}
paths.update({split: {k: inp[f"{split}_{k}"] for k in ("docs", "prompts", "cot", "anchors", "labels")}
              for split in ("train", "val")})
with rule_logging(snakemake.log[0]):
    run_distill(snakemake.config, snakemake.wildcards.student, snakemake.wildcards.method, paths,
                model_dir=Path(snakemake.output.model).parent)
