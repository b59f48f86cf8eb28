"""Cost of a mechanistic distillation step on the demo student (issue 6 benchmark).

    python benchmarks/distill_step.py [--repeats 3] [--doc N] [--threads 2]

Needs the demo artifacts up to head scores (`snakemake --cores all` on config/config.yaml, or
`snakemake --cores all results/icd10_demo/smollm2_l10/heads/coarse.parquet`). On one training
document that has both Phase-1 and Phase-2 positions, the demo student (smollm2_l10) takes a
full optimizer step (forward, loss, backward, AdamW) with
  vanilla : CoT loss only (CE + top-k KL to the teacher)
  mech    : CoT + Phase 1 + Phase 2 losses on the student's head pools
each against precomputed teacher targets (the teacher is not in memory), and
  online  : mech, with the teacher's targets recomputed by the teacher in the same step.
Time: median of --repeats steps after one warm-up step. Memory: peak RSS above the RSS before
the step (benchmarks/head_capture.py's method). Prints the mech/vanilla and online/precomputed
ratios (goal for mech/vanilla: under 1.3x).
"""

from __future__ import annotations

import argparse
import copy
import os
import sys
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))

import torch  # noqa: E402
from head_capture import peak_above, timed  # noqa: E402

from mechdistill import paths  # noqa: E402
from mechdistill.characterize.attention import attention_modules  # noqa: E402
from mechdistill.config import load_config  # noqa: E402
from mechdistill.distill.methods import METHODS  # noqa: E402
from mechdistill.distill.objective import student_loss, teacher_targets  # noqa: E402
from mechdistill.distill.pools import head_pools  # noqa: E402
from mechdistill.distill.signals import has_phase, make_examples  # noqa: E402
from mechdistill.io import read_parquet, read_split  # noqa: E402
from mechdistill.models import ModelCatalog, load_model  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--doc", type=int, default=0, help="which document with both phases (index)")
    ap.add_argument("--threads", type=int, default=min(8, os.cpu_count() or 1))
    args = ap.parse_args()
    torch.set_num_threads(args.threads)

    cfg = load_config(ROOT / "config/config.yaml")
    dataset, teacher_name, student_name = next(iter(cfg["datasets"])), cfg["teacher"], cfg["students"][0]
    split = paths.split_files(dataset, teacher_name, "train")
    for p in split.values():
        if not Path(p).exists():
            sys.exit(f"{p} is missing: run `snakemake --cores all` (demo config) first")
    teacher, t_tok = load_model(ModelCatalog.from_config(cfg), teacher_name, device="cpu", dtype="float32")
    student, s_tok = load_model(ModelCatalog.from_config(cfg), student_name, device="cpu", dtype="float32")

    def pools(model, name):
        return head_pools(cfg["distill"]["pools"], len(attention_modules(model)),
                          read_parquet(paths.head_scores(dataset, name, "coarse")),
                          read_parquet(paths.head_scores(dataset, name, "refine")))

    t_pools, s_pools = pools(teacher, teacher_name), pools(student, student_name)
    train = read_split(split)
    t_examples = make_examples(t_tok, train, teacher_name)
    s_examples = {e.doc_id: e for e in make_examples(s_tok, train, student_name)}
    both = [e for e in t_examples if has_phase(e, "phase1") and has_phase(e, "phase2")]
    if not both:
        sys.exit("no training document has both Phase-1 and Phase-2 positions")
    t_ex = both[args.doc % len(both)]
    s_ex = s_examples[t_ex.doc_id]
    dcfg, tau = cfg["distill"], cfg["heads"]["tau"]
    targets = teacher_targets(teacher, t_ex, t_pools, tau, dcfg["top_k"])
    print(f"document {t_ex.doc_id}: {len(s_ex.input_ids)} tokens, {len(s_ex.early_queries)} early queries, "
          f"{len(s_ex.refine)} refinement positions; student {student_name} "
          f"({student.config.num_hidden_layers} layers), pools "
          f"{ {p: len(pool.heads) for p, pool in s_pools.items()} }, {torch.get_num_threads()} threads, float32")

    model = copy.deepcopy(student).train()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-6)

    def step(method: str, online: bool):
        def run():
            tgt = teacher_targets(teacher, t_ex, t_pools, tau, dcfg["top_k"]) if online else targets
            loss = student_loss(model, s_ex, tgt, s_pools, METHODS[method], tau, dcfg["temperature"])["loss"]
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
        return run

    modes = {"vanilla": step("vanilla", False), "mech": step("mech", False), "online": step("mech", True)}
    for fn in modes.values():
        fn()  # warm-up
    seconds = {name: timed(fn, args.repeats) for name, fn in modes.items()}
    memory = {name: peak_above(fn)[0] for name, fn in modes.items()}
    for name in modes:
        print(f"{name:8s} step {seconds[name]:6.2f} s   peak memory above baseline {memory[name] / 2**20:8.1f} MiB")
    print(f"mech / vanilla: time {seconds['mech'] / seconds['vanilla']:.2f}x, "
          f"memory {memory['mech'] / max(memory['vanilla'], 1):.2f}x  (goal: under 1.3x)")
    print(f"online / precomputed (mech): time {seconds['online'] / seconds['mech']:.2f}x, "
          f"memory {memory['online'] / max(memory['mech'], 1):.2f}x")


if __name__ == "__main__":
    main()
