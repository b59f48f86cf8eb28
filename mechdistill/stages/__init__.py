"""Orchestration: one module per rules/*.smk, each holding only `run_*` functions that read
artifacts, call the library and write artifacts. Nothing in the library imports from here.

data.py          prepare_dataset, build_prompts
teacher.py       teacher_cot
anchors.py       anchors, trajectories, figure1
characterize.py  head_scores, head_figures
patching.py      patching, patching_figures
distill.py       teacher_targets, distill, select_distill, student_predict
evaluate.py      evaluate, tables, figure9
claims.py        claims
"""
