"""Phase 4: which attention heads do the coarse filtering and the refinement.

capture.py          per-head attention rows, queries/keys/values and writes at chosen positions,
                    through attention hooks that work under SDPA / flash attention
scores.py           CoarseScore (Eq. 1), RefineScore (Eq. 3) and their components, as tensor functions
teacher_forcing.py  [prompt; CoT] for any model, with the CoT's character spans mapped to its tokens;
                    the margin's token per label (Eq. 7)
head_scores.py      every head of a model scored over teacher-forced documents (the head tables)
plots.py            Figures 4 and 7
"""
