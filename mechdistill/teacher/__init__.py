"""Phase 2: prompts and the teacher's chains of thought.

prompts.py    candidate label lists, the one-shot exemplar, chat rendering
answers.py    the answer block of a generation -> label ids
backends.py   generation backends: transformers, vLLM, user-supplied traces
generate.py   resumable CoT generation with budget forcing -> the cot artifact
"""
