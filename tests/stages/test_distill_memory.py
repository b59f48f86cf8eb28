"""Per-rank host memory of a distill run is flat in the number of documents: a rank holds the Examples and
the teacher's targets of the documents it trains on now (`signals.SplitExamples`, `targets.TargetsFile`),
not of the whole split.

The tiny train documents, repeated to 8 and to 32 documents of about 5,000 tokens each (their CoT made long
with filler text), each copy with its original's teacher targets; `run_distill` of mech runs in a fresh
subprocess up to the start of training. What the rank holds for its data is its resident memory there
over its resident memory once the student and its pools are loaded (the splits' tables and label spaces,
examples, items, targets). Measured (this test's print): 202 -> 229 MB when every rank held the whole
split, 192 -> 192 MB with per-document reads.
"""

from __future__ import annotations

import copy
import json
import os
import subprocess
import sys

import pandas as pd
from safetensors import safe_open
from safetensors.torch import save_file

from mechdistill import paths
from mechdistill.distill.targets import load_targets
from mechdistill.stages.distill import run_teacher_targets
from tests.helpers import REPO
from tests.stages.conftest import DATASET, STUDENT, TEACHER

FILLER_CHARS = 2600  # the byte tokenizer: one token a character; the tiny prompts are ~2,400 tokens
MAX_TOKENS = 6144   # over the tiny model's context (4,096): rotary positions run on

# Run in the subprocess: resident memory once the student is loaded, and when training starts (what
# `distill` prepared for it is then held); stops there. Freed memory that glibc keeps would make the
# figure depend on the order of allocations, so it is given back first.
MEASURE = r"""
import copy, ctypes, gc, json, sys
from mechdistill.distill import run as run_module
from mechdistill.stages import distill as stage

def rss() -> int:  # what is held: garbage collected, glibc's free heap pages given back
    gc.collect()
    ctypes.CDLL("libc.so.6").malloc_trim(0)
    with open("/proc/self/status") as status:
        return next(int(line.split()[1]) * 1024 for line in status if line.startswith("VmRSS:"))

marks = {}
pools = stage._pools
def loaded(*args, **kwargs):  # the student and its head pools are loaded (and the Parquet reader imported)
    out = pools(*args, **kwargs)
    marks["loaded"] = rss()
    return out

class Started(Exception):
    pass

def train(*args, **kwargs):
    marks["training"] = rss()
    raise Started

stage._pools, run_module.train = loaded, train
args = json.loads(sys.argv[1])
try:
    stage.run_distill(args["config"], args["dataset"], args["student"], "mech", "default", inputs=args["inputs"],
                      train_targets_path=args["targets"], model_dir="out/model", log_path="out/log.parquet",
                      mechanism_path="out/mechanism.parquet", ckpt_dir="out/ckpt", best_path="out/best.json",
                      items_path="out/items.parquet")
except Started:
    pass
print("MARKS " + json.dumps(marks))
"""


def _split(tiny, folder, copies: dict[str, str]) -> dict[str, str]:
    """The tiny train documents under new doc_ids ({new: original}), with long CoTs -> the split's files
    (`paths.split_files` keys)."""
    source = paths.split_files(DATASET, TEACHER, "train")
    files = {"labels": str(tiny.path(source["labels"]))}
    folder.mkdir()
    for key in ("docs", "prompts", "cot", "anchors"):
        rows = pd.read_parquet(tiny.path(source[key])).set_index("doc_id")
        out = pd.concat([rows.loc[[original]].assign(doc_id=new) for new, original in copies.items()])
        if key == "cot":  # a long CoT; the anchors' spans index its start, which stays as it was
            filler = " ".join(f"step {i} weighs the candidates." for i in range(FILLER_CHARS // 30))
            out["cot"] = out["cot"] + " " + filler
        files[key] = str(folder / f"{key}.parquet")
        out.reset_index(drop=True).to_parquet(files[key])
    return files


def _config(tiny) -> dict:
    config = copy.deepcopy(tiny.config)
    config["distill"]["max_tokens"] = MAX_TOKENS
    return config


def _long_targets(tiny, folder) -> tuple[list[str], str]:
    """The teacher targets of the tiny train documents with long CoTs (their doc_ids kept)."""
    originals = list(pd.read_parquet(tiny.path(paths.anchors(DATASET, TEACHER, "train")))["doc_id"])
    files = _split(tiny, folder, {d: d for d in originals})
    with tiny.inside():
        run_teacher_targets(_config(tiny), DATASET, "train", inputs=files,
                            out_path=folder / "targets.parquet", tensors_path=folder / "targets.safetensors")
    return originals, folder / "targets.safetensors"


def _held_for_data(tiny, folder, long_targets, n_docs: int) -> tuple[int, int]:
    """(bytes resident when training on `n_docs` documents starts, over those once the student and its
    pools are loaded; total tokens of the split)."""
    originals, targets_path = long_targets
    copies = {f"{originals[i % len(originals)]}-{i}": originals[i % len(originals)] for i in range(n_docs)}
    files = _split(tiny, folder, copies)
    by_doc = load_targets(targets_path)  # each copy gets its original's targets, under its doc_id
    with safe_open(str(targets_path), "pt") as f:
        metadata = f.metadata()
    save_file({f"{new}/{name}": t.clone() for new, original in copies.items() for name, t in by_doc[original].items()},
              str(folder / "targets.safetensors"), metadata=metadata)
    tokens = sum(len(by_doc[original]["input_ids"]) for original in copies.values())
    args = dict(config=_config(tiny), dataset=DATASET, student=STUDENT, inputs={"train": files},
                targets=str(folder / "targets.safetensors"))
    done = subprocess.run([sys.executable, "-c", MEASURE, json.dumps(args)], cwd=tiny.root, capture_output=True,
                          text=True, timeout=300, env={**os.environ, "PYTHONPATH": str(REPO), "HF_HUB_OFFLINE": "1",
                                                       "OMP_NUM_THREADS": "1"})
    assert done.returncode == 0, done.stderr[-3000:]
    marks = json.loads(done.stdout.split("MARKS ")[-1])
    return marks["training"] - marks["loaded"], tokens


def test_a_distill_rank_holds_about_the_same_memory_for_8_and_32_documents(tiny, tmp_path):
    tiny.ensure("teacher_targets")  # head scores and the val targets
    long_targets = _long_targets(tiny, tmp_path / "long")
    few, few_tokens = _held_for_data(tiny, tmp_path / "docs8", long_targets, 8)
    many, many_tokens = _held_for_data(tiny, tmp_path / "docs32", long_targets, 32)
    print(f"held for data: {few / 2**20:.1f} MB with 8 documents ({few_tokens} tokens), "
          f"{many / 2**20:.1f} MB with 32 ({many_tokens} tokens)")
    assert many_tokens - few_tokens > 110_000
    # Held for the whole split (Examples with tuple offsets, every target tensor), the data grows by ~210 B a
    # token (25 MB here, 12% of the 8 documents' figure, which the ICD-10-CM label spaces dominate); lazily,
    # what is left is the allocator's noise (up to ~50 B a token measured in a full suite run)
    assert (many - few) / (many_tokens - few_tokens) < 100, (few, many)
    assert abs(many - few) < 0.1 * few, (few, many)
