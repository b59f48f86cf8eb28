"""Phase 3: what the chains of thought say, measured from text.

concepts.py      anchors: gold label titles (+ ancestors) or concepts an auxiliary LLM extracts
near_misses.py   near-miss labels (hierarchy, embedding, ruled out by the CoT) and the CoT shortlist
segment.py       CoT spans as character offsets (early span, mentions, refinement sentences)
anchor_table.py  one anchors row per document (the anchors artifact)
embed.py         the frozen sentence embedder shared by teacher and student measurements; texts
                 longer than it reads embedded whole, in windows
trajectories.py  Reasoning Focus F(t) and Near-Miss Confusion C(t)
plots.py         Figure 1
"""
