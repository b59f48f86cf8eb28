"""Orchestration: one module per rules/*.smk, each holding only `run_*` functions that read
artifacts, call the library and write artifacts, and model_free.py for the jobs of any phase that
load no model (they import no torch, so they start in a second). Nothing in the library imports from here.

data.py          prepare_dataset, build_prompts
teacher.py       teacher_cot
anchors.py       anchors, trajectories
characterize.py  head_scores
patching.py      patching
distill.py       teacher_targets, baseline_teacher_data, distill, student_predict
evaluate.py      evaluate
claims.py        claims (model-free too)
model_free.py    figure1, head_figures, head_comparison, patching_figures, select_distill, tables, figure9
"""
