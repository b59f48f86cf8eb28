"""Which layers a layer-subset demo student should keep: the CE of each untrained subset on the teacher's
supervised train sequences (prompt + CoT + answer + end of turn; loss on the output tokens only).

A subset that starts near the teacher's own loss needs few steps to write answers; one that starts far
off does not learn to in the demo's 12 steps. Usage (after a demo run wrote results/):

    PYTHONPATH=. HF_HUB_OFFLINE=1 python benchmarks/layer_subsets.py [--results results] [--docs 6]

Prints one line per subset: its layers, the number kept and the mean CE per output token.
"""

from __future__ import annotations

import argparse
import copy
import json
import time

import torch

from mechdistill.config import load_config
from mechdistill.io import read_parquet
from mechdistill.models import ModelCatalog, keep_layers, load_model, select_layers
from mechdistill.teacher.answers import end_of_turn, supervised_output
from mechdistill.teacher.prompts import render_prompt

SUBSETS = {
    "all 30": list(range(30)),
    "24 evenly spaced (n_layers: 24)": select_layers(30, 24),
    "20 evenly spaced": select_layers(30, 20),
    "16 evenly spaced": select_layers(30, 16),
    "first 12 + last 6 (18)": list(range(12)) + list(range(24, 30)),
    "first 14 + last 6 (20)": list(range(14)) + list(range(24, 30)),
    "first 10 + last 6 (16)": list(range(10)) + list(range(24, 30)),
    "first 16 + last 4 (20)": list(range(16)) + list(range(26, 30)),
    "first 6 + last 12 (18)": list(range(6)) + list(range(18, 30)),
}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--results", default="results")
    parser.add_argument("--docs", type=int, default=6)
    args = parser.parse_args()
    config = load_config("config/config.yaml")
    teacher = config["teacher"]
    model, tok = load_model(ModelCatalog.from_config(config), teacher, device="cpu", dtype="float32")
    ds = next(iter(config["datasets"]))
    cot = read_parquet(f"{args.results}/{ds}/{teacher}/cot/train.parquet").set_index("doc_id")
    prompts = read_parquet(f"{args.results}/{ds}/prompts/train.parquet").set_index("doc_id")
    eot = end_of_turn(tok)
    batch = []
    for doc_id in list(cot.index)[:args.docs]:
        prompt = render_prompt(tok, json.loads(prompts.loc[doc_id, "messages"]))
        output = supervised_output(str(cot.loc[doc_id, "cot"]), str(cot.loc[doc_id, "raw"]), eot)
        p = tok(prompt, add_special_tokens=False)["input_ids"]
        o = tok(output, add_special_tokens=False)["input_ids"]
        batch.append((torch.tensor([p + o]), len(p)))
    results = {}
    for name, layers in SUBSETS.items():
        sub = keep_layers(copy.deepcopy(model), layers)
        started, total, n = time.perf_counter(), 0.0, 0
        with torch.no_grad():
            for ids, n_prompt in batch:
                logits = sub(input_ids=ids, use_cache=False).logits[0, n_prompt - 1:-1]   # [output, vocab]
                total += torch.nn.functional.cross_entropy(logits, ids[0, n_prompt:], reduction="sum").item()
                n += ids.shape[1] - n_prompt
        results[name] = total / n
        print(f"{name:34s} {len(layers):2d} layers  CE {total / n:7.3f}  ({time.perf_counter() - started:.0f} s) {layers}",
              flush=True)
        del sub


if __name__ == "__main__":
    main()
