"""Per-head capture cost on SmolLM2-135M: time and peak memory vs one plain forward.

    python benchmarks/head_capture.py [--seq 1024] [--early 32] [--refine 16] [--keys 16] [--repeats 5]
    python benchmarks/head_capture.py --peers [--scaling 512,1024,2048,4096]   # vs TransformerLens, nnsight

One teacher-forced sequence of `--seq` tokens (repeated real text), no gradients, use_cache=False:
  plain   : model(ids) under SDPA
  capture : capture_heads(...) under SDPA, all layers and heads: rows (float32), q/k, values,
            writes and value_writes at 32 early + 16 refinement query positions and 16 key positions
  lean    : the same with per-head z (o_proj input) instead of writes/value_writes (writes are then
            z^h @ W_O^h on demand, for the heads a score or loss needs)
  naive   : eager, output_attentions=True, keeping all [layers, heads, seq, seq] rows plus the full
            o_proj inputs of every layer, then slicing the same positions out
Time: median of `--repeats` runs after a warm-up (naive: one run), all modes timed before any
memory run. Memory: peak RSS (Linux VmHWM,
reset through /proc/self/clear_refs before each measured run) minus the RSS just before the run,
i.e. the forward's own peak working memory above the loaded model (glibc mmap threshold fixed and
malloc_trim before each run, so freed tensors do not hide in the heap); one process measures all.
Then the capture's memory formula (mechdistill.heads.capture_nbytes) for a 70B-shaped config.
"""

from __future__ import annotations

import argparse
import ctypes
import gc
import os
import statistics
import sys
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))  # this checkout's mechdistill

import torch  # noqa: E402

from mechdistill.characterize.attention import attention_modules  # noqa: E402
from mechdistill.characterize.capture import capture_heads, capture_nbytes  # noqa: E402
from mechdistill.config import load_config  # noqa: E402
from mechdistill.models import ModelCatalog, load_model  # noqa: E402

TEXT = ("Patient presents with chest pain radiating to the left arm, shortness of breath and "
        "diaphoresis. ECG shows ST elevation in leads II, III and aVF. Troponin is elevated. "
        "The broad area is ischemic heart disease; we choose acute inferior STEMI rather than "
        "unstable angina, because of the ST elevation and the troponin rise. ")


_LIBC = ctypes.CDLL("libc.so.6")


def _status() -> dict[str, int]:
    out = {}
    for line in open("/proc/self/status"):
        key, val = line.split(":", 1)
        if key in ("VmRSS", "VmHWM"):
            out[key] = int(val.split()[0]) * 1024
    return out


def peak_above(fn) -> tuple[float, object]:
    """Run fn once; return (peak RSS above the RSS before it, in bytes; fn's result)."""
    gc.collect()
    _LIBC.malloc_trim(0)
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")  # reset VmHWM to the current RSS
    before = _status()["VmRSS"]
    result = fn()
    return _status()["VmHWM"] - before, result


def timed(fn, repeats: int) -> float:
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def main() -> None:
    if "--peers" in sys.argv:  # beside TransformerLens and nnsight: benchmarks/capture_peers.py
        sys.path.insert(0, str(ROOT / "benchmarks"))
        from capture_peers import main as peers

        peers(sys.argv[1:])
        return
    ap = argparse.ArgumentParser()
    ap.add_argument("--seq", type=int, default=1024)
    ap.add_argument("--early", type=int, default=32)
    ap.add_argument("--refine", type=int, default=16)
    ap.add_argument("--keys", type=int, default=16)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--threads", type=int, default=min(8, os.cpu_count() or 1))
    args = ap.parse_args()
    torch.set_num_threads(args.threads)

    cfg = load_config(ROOT / "config/config.yaml", {"cache_dir": "/tmp/mdcache"})
    model, tok = load_model(ModelCatalog.from_config(cfg), "smollm2", device="cpu")
    model.eval()
    model.set_attn_implementation("sdpa")
    ids = tok(TEXT * 200, return_tensors="pt").input_ids[:, : args.seq]
    seq = ids.shape[1]
    # prompt = first 60%, CoT = the rest: early queries at the CoT start, refinement positions later
    cot0 = int(0.6 * seq)
    early = torch.arange(cot0, cot0 + args.early)
    refine = torch.linspace(cot0 + args.early + 10, seq - 1, args.refine).long()
    qpos = torch.cat([early, refine])[None]  # [1, 48]
    kpos = torch.linspace(5, cot0 - 1, args.keys).long()[None]  # [1, 16] shortlist-like key positions
    what = ("rows", "qk", "values", "writes", "value_writes")
    mods = attention_modules(model)
    mc = model.config
    n_layers, n_heads, n_kv = len(mods), mc.num_attention_heads, mc.num_key_value_heads
    head_dim = mods[0].head_dim
    print(f"SmolLM2-135M: {n_layers} layers, {n_heads} heads / {n_kv} kv heads, head_dim {head_dim}, "
          f"d_model {mc.hidden_size}; seq {seq}, {qpos.shape[1]} query positions, {kpos.shape[1]} key positions, "
          f"{torch.get_num_threads()} threads, float32, no grad")

    def plain():
        return model(ids, use_cache=False).logits

    def capture():
        return capture_heads(model, ids, query_positions=qpos, key_positions=kpos, what=what)

    def naive():
        model.set_attn_implementation("eager")
        zs: dict[int, torch.Tensor] = {}
        hooks = [m.o_proj.register_forward_pre_hook(lambda mod, a, i=i: zs.__setitem__(i, a[0]))
                 for i, m in enumerate(mods)]
        try:
            out = model(ids, use_cache=False, output_attentions=True)
        finally:
            for h in hooks:
                h.remove()
            model.set_attn_implementation("sdpa")
        rows = {i: a[:, :, qpos[0]] for i, a in enumerate(out.attentions)}  # all rows kept in out
        writes = {i: torch.einsum("bqhd,hdm->bqhm", z[:, qpos[0]].view(1, -1, n_heads, head_dim),
                                  m.o_proj.weight.view(-1, n_heads, head_dim).permute(1, 2, 0))
                  for (i, z), m in zip(zs.items(), mods)}
        return out, rows, writes

    def capture_lean():
        return capture_heads(model, ids, query_positions=qpos, key_positions=kpos,
                             what=("rows", "qk", "values", "z"))

    modes = (("plain", plain), ("capture", capture), ("lean", capture_lean), ("naive", naive))
    with torch.no_grad():
        times = {}
        for name, fn in modes:  # timings first, with glibc's default allocator settings
            fn()  # warm-up
            times[name] = timed(fn, args.repeats if name != "naive" else 1)
        # Fixed mmap threshold: every large tensor is mmapped and returned to the OS when freed, so
        # RSS tracks live memory (the dynamic threshold would recycle freed heap invisibly). Slows
        # allocation, hence only for the memory runs.
        _LIBC.mallopt(-3, 128 * 1024)  # M_MMAP_THRESHOLD
        res = {}
        for name, fn in modes:
            mem, result = peak_above(fn)
            del result
            res[name] = (times[name], mem)
        _, cap = capture()

    t0, m0 = res["plain"]
    print(f"{'':8s} {'time s':>8s} {'x plain':>8s} {'peak MiB':>9s} {'extra vs plain':>15s}")
    for name, (t, m) in res.items():
        extra = (m - m0) / m0 if name != "plain" else 0.0
        print(f"{name:8s} {t:8.3f} {t / t0:8.2f} {m / 2**20:9.1f} {100 * extra:14.1f}%")
    print(f"goals: capture time < 1.5x plain, peak memory above plain < 25% "
          f"(memory = peak RSS above the pre-call RSS; model weights {sum(p.numel() for p in model.parameters()) * 4 / 2**20:.0f} MiB excluded)")

    est = capture_nbytes(n_layers, n_heads, head_dim, mc.hidden_size, seq, qpos.shape[1], kpos.shape[1],
                         bytes_per=4, what=what)
    print(f"capture held: {cap.nbytes() / 2**20:.2f} MiB measured, {est['total_held'] / 2**20:.2f} MiB by formula")

    print("\nMemory formula (L layers, B batch, H query heads, S seq, nq queries, nk keys, dh head_dim, "
          "D d_model, b bytes):\n"
          "  held = L*B*H*(nq*S*b_rows + nq*dh*b + 2*nk*dh*b + nq*D*b + nk*D*b)   "
          "[rows, q, k+v, writes, value_writes]\n"
          "  transient per layer: B*H*nq*S*4 (float32 row logits); naive: L*B*H*S*S*b")
    shape70 = dict(n_layers=80, n_heads=64, head_dim=128, d_model=8192, seq=8192, n_query=48, n_key=16,
                   bytes_per=2)
    for label, w in (("rows,q,k,v,writes,value_writes", what),
                     ("rows,q,k,v,z (writes computed on demand)", ("rows", "qk", "values", "z"))):
        e = capture_nbytes(**shape70, what=w)
        parts = ", ".join(f"{k} {v / 2**30:.3f}" for k, v in e.items() if v and k != "total_held")
        print(f"70B-shaped (80 L, 64 H, 8 KV, dh 128, D 8192, S 8192, 32+16 queries, 16 keys, bf16), {label}:\n"
              f"  {parts} GiB -> held {e['total_held'] / 2**30:.2f} GiB")
    naive70 = 80 * 64 * 8192 * 8192 * 2
    print(f"  naive all [L, H, S, S] rows in bf16: {naive70 / 2**30:.0f} GiB")


if __name__ == "__main__":
    main()
