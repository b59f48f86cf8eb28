from mechdistill.logutil import rule_logging
from mechdistill.paths import SPLIT_FILES
from mechdistill.stages.distill import run_distill

wc, inp, out = snakemake.wildcards, snakemake.input, snakemake.output
with rule_logging(snakemake.log[0]):
    run_distill(snakemake.config, wc.dataset, wc.student, wc.method, wc.point,
                inputs={split: {k: inp[f"{split}_{k}"] for k in SPLIT_FILES} for split in ("train", "val")},
                train_targets_path=inp.train_targets, val_targets_path=inp.val_targets,
                student_coarse=inp.student_coarse, student_refine=inp.student_refine,
                teacher_coarse=inp.teacher_coarse, teacher_refine=inp.teacher_refine,
                log_path=out.log, mechanism_path=out.mechanism, best_path=out.best)
