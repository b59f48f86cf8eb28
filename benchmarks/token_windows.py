"""Characters a model's early window covers on the teacher's CoTs.

Teacher: SmolLM2 (config/config.yaml); model: the byte-level tokenizer (one token per byte), standing in
for a student whose tokenizer merges differently from the teacher's. Old rule: the model's own first N
tokens; new rule (`anchors.trajectories.early_late_units`): the model's tokens overlapping the
characters of the teacher's first N tokens.

    PYTHONPATH=. HF_HUB_OFFLINE=1 python benchmarks/token_windows.py results/icd10_demo/smollm2/cot/test.parquet 16
"""

from __future__ import annotations

import sys

import pandas as pd

from mechdistill.anchors.trajectories import early_late_units
from mechdistill.config import load_config
from mechdistill.models import ModelCatalog, byte_tokenizer, load_tokenizer
from mechdistill.text import token_units


def main(cot_path: str, n: int) -> None:
    teacher = load_tokenizer(ModelCatalog.from_config(load_config("config/config.yaml")), "smollm2")
    model = byte_tokenizer()
    cots = pd.read_parquet(cot_path)["cot"].tolist()
    chars = {"teacher's first N tokens": [len("".join(token_units(teacher, t)[:n])) for t in cots],
             "model's own first N tokens (old)": [len("".join(token_units(model, t)[:n])) for t in cots],
             "model's tokens in the teacher's window (new)":
                 [len("".join(early_late_units(t, model, teacher, n)[0])) for t in cots]}
    print(f"N = {n}, {len(cots)} CoTs ({cot_path})\n| window | mean characters |\n|---|---|")
    for name, values in chars.items():
        print(f"| {name} | {sum(values) / max(len(values), 1):.1f} |")
    same = chars["model's tokens in the teacher's window (new)"] == chars["teacher's first N tokens"]
    print(f"new window covers exactly the teacher's characters on every CoT: {same}")


if __name__ == "__main__":
    main(sys.argv[1], int(sys.argv[2]) if len(sys.argv) > 2 else 16)
