"""Phase 6: mechanistic distillation of the teacher into a student (Sec. 3, App. B).

pools.py      head pools per phase (top-k heads by CoarseScore / RefineScore in a band of layers)
              and the pooled quantities: attention rows, writes, QK loop-back, OV helpfulness
pool_ranges.py  which layers a pool's band holds for a model's depth, checked at start-up (torch-free)
signals.py    one teacher-forced forward -> logits and both phases' pooled signals; examples of a
              split; the mechanism metrics (Sharpness, AnchorAlign, LoopBack, Helpfulness)
losses.py     CoT loss (CE + top-k KL, cross-tokenizer variant), Phase 1 (Eq. 5), Phase 2 (Eq. 6), total
objective.py  the teacher's side of every loss for one document, and the student's loss
methods.py    the methods by name (vanilla, mech, phase and term ablations, the four baselines): kind,
              loss-term switches, the module of their recipe; their hyper-parameter grids
catalog.py    the baselines' names, settings and teacher needs, without torch
recipe.py     what a method is made of: Recipe (items, loss, params, teacher data, relabelling,
              inference), Item, RecipeContext, MethodPoint
mech.py       the recipe of vanilla, mech and the ablations: the student's loss against the teacher's targets
run.py        `distill()`: one run of any recipe (items, trainer, mechanism metrics before and after)
targets.py    teacher targets computed once and stored (or online), so training needs no teacher
trainer.py    the optimisation loop: steps, accumulation, evaluation, the best step, exact resume
train_config.py  TrainConfig: the optimisation settings (and their defaults) of one run
backends.py   how a step is taken: one device (AdamW, warmup + cosine, autocast) or DeepSpeed ZeRO-3
run_state.py  a run's state and files: progress, log, best step and its weights, checkpoints and their key
reporting.py  live curves: each log row streamed from rank 0 to TensorBoard / W&B (distill.train.report_to)
baselines/    the four CoT-distillation baselines (UniCoTT, MoRSD, SemCoT, CWT), one recipe module each:
              their training items, losses, extra teacher data and (SemCoT) inference; causal_lm.py the
              sequence pieces they share
launch.py     starting the ranks of a run, each rank's shard, its DeepSpeed config
selection.py  validation criteria, the best step of a train log and the best grid point of a method,
              publishing the chosen point as the method's model (hard links)
"""
