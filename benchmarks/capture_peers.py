"""Our head capture beside the tools researchers already use: TransformerLens and nnsight.

    python benchmarks/head_capture.py --peers [--seq 1024] [--threads 2] [--repeats 3]
    python benchmarks/head_capture.py --peers --scaling 512,1024,2048,4096

Every tool gets the same model (SmolLM2-135M-Instruct, float32, no gradients), input, threads and
quantities: the attention rows A^h_q of every head of every layer at 48 query positions (32 early,
16 refinement), and every head's write Delta^h_q = z^h_q W_O^h at those positions.

  plain             model(ids) under SDPA: the floor, since every tool needs this forward
  capture           mechdistill's capture_heads(what=("rows", "writes")) under SDPA
  capture_lean      the same holding rows in float16 and z (o_proj's input per head) instead of writes:
                    each write z^h W_O^h is formed when a score needs it (here after the call)
  transformer_lens  TransformerBridge (TransformerLens 4.x) over the same Hugging Face model:
                    run_with_cache(names_filter=hook_pattern, hook_z), sliced at the queries;
                    writes = z W_O per head
  nnsight           LanguageModel(model).trace with eager attention (SDPA returns no weights),
                    saving the attention weights and o_proj's input at the queries; writes = z W_O

Each (tool, length) runs in its own process, one at a time, with the address space capped at
--mem-limit-gib: a run that needs more fails to allocate and is reported as out of memory.
Time: the median of --repeats calls after a warm-up. Memory: the peak RSS of the call above the RSS
just before it (Linux VmHWM, reset through /proc/self/clear_refs; glibc's mmap threshold fixed so
freed tensors go back to the OS), so it counts the forward's working memory and what the call
returns, not the loaded model. The rows and writes of the peers are compared with capture's.
Optional: a peer that is not installed is skipped with a message (pip install transformer-lens nnsight).
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
TOOLS = ("plain", "capture", "capture_lean", "transformer_lens", "nnsight")
PACKAGE = {"transformer_lens": "transformer_lens", "nnsight": "nnsight"}


def available(tool: str) -> bool:
    """Whether the tool's package can be imported here (checked without importing it)."""
    import importlib.util

    return tool not in PACKAGE or importlib.util.find_spec(PACKAGE[tool]) is not None


# ----------------------------------------------------------------------------- one (tool, length), in a child


def out_projections(model) -> list:
    """W_O per head of every layer, [H, dh, D]. Taken before a peer wraps the model: TransformerLens's
    bridge changes the modules it is given."""
    from mechdistill.characterize.attention import attention_modules, head_out_proj

    return [head_out_proj(m).detach().clone() for m in attention_modules(model)]


def writes_from(w_o: list, zs: list) -> list:
    """Per-head writes z^h W_O^h: per layer z [nq, H, dh] -> [nq, H, D]."""
    import torch

    return [torch.einsum("qhd,hdm->qhm", z, w) for z, w in zip(zs, w_o)]


def runner(tool: str, model, tok, ids, qpos):
    """A no-argument function running `tool` once -> (rows, writes): per layer [H, nq, S] and [nq, H, D]
    (lists, as each tool holds them: stacking would copy them inside the measured call), or None."""
    import torch

    from mechdistill.characterize.attention import attention_modules
    from mechdistill.characterize.capture import capture_heads

    mods = attention_modules(model)
    n_heads = model.config.num_attention_heads
    w_o = out_projections(model)

    if tool == "plain":
        def run():
            model(ids, use_cache=False)
        return run
    if tool == "capture":
        def run():
            _, cap = capture_heads(model, ids, query_positions=qpos, what=("rows", "writes"))
            return [cap.rows[i][0] for i in range(len(mods))], [cap.writes[i][0] for i in range(len(mods))]
        return run
    if tool == "capture_lean":
        def run():
            _, cap = capture_heads(model, ids, query_positions=qpos, what=("rows", "z"), rows_dtype=torch.float16)
            return [cap.rows[i][0] for i in range(len(mods))], [cap.z[i][0] for i in range(len(mods))]
        return run
    if tool == "transformer_lens":
        from transformer_lens.model_bridge import TransformerBridge

        bridge = TransformerBridge.boot_transformers(model.config._name_or_path or "llama", hf_model=model,
                                                     tokenizer=tok)
        wanted = ("attn.hook_pattern", "attn.hook_z")

        def run():
            _, cache = bridge.run_with_cache(ids, names_filter=lambda name: name.endswith(wanted))
            rows = [cache[f"blocks.{i}.attn.hook_pattern"][0][:, qpos] for i in range(len(mods))]
            zs = [cache[f"blocks.{i}.attn.hook_z"][0][qpos].reshape(len(qpos), n_heads, -1) for i in range(len(mods))]
            return rows, writes_from(w_o, zs)
        return run
    if tool == "nnsight":
        from nnsight import LanguageModel

        model.set_attn_implementation("eager")
        lm = LanguageModel(model, tokenizer=tok)

        def run():
            rows, zs = [], []
            with lm.trace(ids):  # in module order: o_proj's input comes before the attention's output
                for layer in lm.model.layers:
                    zs.append(layer.self_attn.o_proj.input[0][qpos].save())
                    rows.append(layer.self_attn.output[1][0][:, qpos].save())
            return rows, writes_from(w_o, [z.reshape(len(qpos), n_heads, -1) for z in zs])
        return run
    raise ValueError(f"unknown tool {tool!r}")


def child(tool: str, seq: int, threads: int, repeats: int, out: Path) -> dict:
    """Load the model, time and measure `tool` at `seq` tokens; save its rows and writes to `out`."""
    sys.path.insert(0, str(ROOT))
    sys.path.insert(0, str(ROOT / "benchmarks"))
    import torch
    from head_capture import _LIBC, TEXT, peak_above, timed
    from safetensors.torch import save_file

    from mechdistill.config import load_config
    from mechdistill.models import ModelCatalog, load_model

    torch.set_num_threads(threads)
    cfg = load_config(ROOT / "config/config.yaml", {"cache_dir": "/tmp/mdcache"})
    model, tok = load_model(ModelCatalog.from_config(cfg), "smollm2", device="cpu")
    model.eval()
    model.set_attn_implementation("sdpa")
    ids = tok(TEXT * (seq // 40 + 10), return_tensors="pt").input_ids[:, :seq]
    cot0 = int(0.6 * seq)  # the layout of head_capture.py: early queries at the CoT start, refinement later
    qpos = torch.cat([torch.arange(cot0, cot0 + 32), torch.linspace(cot0 + 42, seq - 1, 16).long()])
    with torch.no_grad():
        run = runner(tool, model, tok, ids, qpos)
        try:
            result = run()  # warm-up
            seconds = timed(run, repeats)
            del result
            _LIBC.mallopt(-3, 128 * 1024)  # M_MMAP_THRESHOLD: freed tensors leave RSS (see head_capture.py)
            peak, result = peak_above(run)
        except (RuntimeError, MemoryError) as exc:  # the address-space cap: an allocation failed
            return {"tool": tool, "seq": seq, "error": f"out of memory ({type(exc).__name__}: {str(exc)[:120]})"}
    held = sum(t.numel() * t.element_size() for part in result or () for t in part)  # what the call returns
    if result is not None:
        rows, writes = result
        if tool == "capture_lean":  # z -> writes, outside the measured call
            writes = writes_from(out_projections(model), writes)
        save_file({"rows": torch.stack(rows).float(), "writes": torch.stack(writes)}, str(out))
    return {"tool": tool, "seq": seq, "seconds": seconds, "peak_bytes": peak, "held_bytes": held}


# ----------------------------------------------------------------------------- the parent: runs and tables


def run_child(tool: str, seq: int, args, out: Path) -> dict:
    limit = int(args.mem_limit_gib * 2**30)

    def cap_memory():
        resource.setrlimit(resource.RLIMIT_AS, (limit, limit))

    cmd = [sys.executable, __file__, "--child", tool, "--seq", str(seq), "--threads", str(args.threads),
           "--repeats", str(args.repeats), "--out", str(out)]
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "PYTHONWARNINGS": "ignore"}
    proc = subprocess.run(cmd, capture_output=True, text=True, preexec_fn=cap_memory, env=env)
    lines = [line for line in proc.stdout.splitlines() if line.startswith("{")]
    if proc.returncode != 0 or not lines:
        tail = (proc.stderr or proc.stdout).strip().splitlines()[-1:] or [f"exit {proc.returncode}"]
        oom = proc.returncode in (-9, 137) or "memory" in tail[0].lower()
        return {"tool": tool, "seq": seq, "error": ("out of memory: " if oom else "failed: ") + tail[0][:160]}
    return json.loads(lines[-1])


def max_difference(a: Path, b: Path) -> dict[str, float]:
    from safetensors.torch import load_file

    x, y = load_file(str(a)), load_file(str(b))
    return {k: float((x[k] - y[k]).abs().max()) for k in ("rows", "writes")}


def measure(seq: int, tools: list[str], args, folder: Path) -> dict[str, dict]:
    results = {}
    for tool in tools:
        print(f"  {tool} at {seq} tokens ...", file=sys.stderr, flush=True)
        results[tool] = run_child(tool, seq, args, folder / f"{tool}-{seq}.safetensors")
    reference = folder / f"capture-{seq}.safetensors"
    for tool in ("capture_lean", "transformer_lens", "nnsight"):
        mine = folder / f"{tool}-{seq}.safetensors"
        if tool in results and "error" not in results[tool] and reference.exists() and mine.exists():
            results[tool]["vs_capture"] = max_difference(mine, reference)
    return results


def side_by_side(results: dict[str, dict], seq: int) -> str:
    plain = results["plain"]
    lines = [f"seq {seq}: time and peak memory of the call, as ratios to the plain forward",
             f"{'tool':17s} {'time s':>8s} {'x plain':>8s} {'peak MiB':>9s} {'x plain':>8s} {'returns MiB':>11s}"
             "  max |diff| vs capture"]
    for tool, r in results.items():
        if "error" in r:
            lines.append(f"{tool:17s} {r['error']}")
            continue
        diff = r.get("vs_capture")
        diff_text = f"rows {diff['rows']:.1e}, writes {diff['writes']:.1e}" if diff else ""
        lines.append(f"{tool:17s} {r['seconds']:8.3f} {r['seconds'] / plain['seconds']:8.2f} "
                     f"{r['peak_bytes'] / 2**20:9.1f} {r['peak_bytes'] / plain['peak_bytes']:8.2f} "
                     f"{r['held_bytes'] / 2**20:11.1f}  {diff_text}")
    return "\n".join(lines)


def scaling_table(by_seq: dict[int, dict[str, dict]]) -> str:
    tools = list(next(iter(by_seq.values())))
    head = f"{'seq':>6s} " + " ".join(f"{t:>24s}" for t in tools)
    lines = ["peak MiB (x plain) and seconds per call, by sequence length", head]
    for seq, results in by_seq.items():
        cells = []
        for tool in tools:
            r = results[tool]
            if "error" in r:
                cells.append(f"{'out of memory' if 'memory' in r['error'] else 'failed':>24s}")
            else:
                ratio = r["peak_bytes"] / results["plain"]["peak_bytes"] if "error" not in results["plain"] else 0
                cells.append(f"{r['peak_bytes'] / 2**20:8.0f} ({ratio:4.2f}x) {r['seconds']:7.2f}s")
        lines.append(f"{seq:6d} " + " ".join(cells))
    seqs = list(by_seq)
    for tool in tools:
        ok = [(s, by_seq[s][tool]["peak_bytes"]) for s in seqs if "error" not in by_seq[s][tool]]
        if len(ok) >= 2:
            (s0, m0), (s1, m1) = ok[0], ok[-1]
            import math
            slope = math.log(m1 / m0) / math.log(s1 / s0)
            lines.append(f"{tool}: peak memory grows as seq^{slope:.2f} from {s0} to {s1} tokens")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--peers", action="store_true")
    ap.add_argument("--seq", type=int, default=1024)
    ap.add_argument("--scaling", type=str, default="", help="comma-separated lengths, e.g. 512,1024,2048,4096")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--mem-limit-gib", type=float, default=16.0, help="address-space cap of each run")
    ap.add_argument("--child", choices=TOOLS, help=argparse.SUPPRESS)
    ap.add_argument("--out", type=Path, help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.child:
        print(json.dumps(child(args.child, args.seq, args.threads, args.repeats, args.out)))
        return
    tools = [t for t in TOOLS if available(t)]
    for tool in set(TOOLS) - set(tools):
        print(f"{tool}: not installed, skipped (pip install {PACKAGE[tool].replace('_', '-')})")
    lengths = [int(s) for s in args.scaling.split(",") if s] or [args.seq]
    print(f"SmolLM2-135M-Instruct, float32, no grad, {args.threads} threads, 48 query positions, all 30 layers x "
          f"9 heads; one process per tool and length, address space capped at {args.mem_limit_gib:g} GiB")
    with tempfile.TemporaryDirectory() as folder:
        by_seq = {seq: measure(seq, tools, args, Path(folder)) for seq in lengths}
    for seq, results in by_seq.items():
        print()
        print(side_by_side(results, seq))
    if len(lengths) > 1:
        print()
        print(scaling_table(by_seq))


if __name__ == "__main__":
    main()
