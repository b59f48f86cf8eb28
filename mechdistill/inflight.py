"""Several documents in flight on one model: keep every GPU of a device-mapped model busy.

A model that a device map spreads over G GPUs (`models.load_model(device_map=...)`) runs its layers one
GPU after another: with one document at a time, one GPU of the G computes and the others wait. Running
`workers` documents at once, each in its own thread, lets document i+1 compute on GPU 0 while document i
is on GPU 1: pipelined micro-batches of one document each. Every document's arithmetic is unchanged (the
same kernels on the same inputs), so its outputs and captures are exactly those of a sequential run;
the hooks that capture or patch heads dispatch by thread (`characterize.attention`), so concurrent
documents never see each other's hooks.

Limits: a device map that offloads weights to the CPU or disk is not thread-safe (accelerate copies the
weights into the module during the forward): `workers` must be 1 there. On a CPU the threads only
interleave (the two cores are shared); the gain is on GPUs, where kernels run asynchronously.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Callable, Iterable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from typing import TypeVar

Item = TypeVar("Item")
Result = TypeVar("Result")


def in_flight(fn: Callable[[Item], Result], items: Iterable[Item], workers: int = 1) -> Iterator[Result]:
    """fn(item) for every item, in the items' order, with up to `workers` calls running at once.

    workers 1 runs in the calling thread (no thread at all). At most `workers` results wait unread, so a
    consumer that writes each result as it comes (a resumable shard) holds a bounded number in memory.
    An exception in any call is raised here, at that item, after the calls already started have ended.
    """
    if workers < 1:
        raise ValueError(f"in_flight: workers must be >= 1, got {workers}")
    if workers == 1:
        yield from map(fn, items)
        return
    pending: deque[Future] = deque()
    with ThreadPoolExecutor(max_workers=workers, thread_name_prefix="in-flight") as pool:
        for item in items:
            pending.append(pool.submit(fn, item))
            if len(pending) >= workers:
                yield pending.popleft().result()
        while pending:
            yield pending.popleft().result()


def in_flight_workers(model: object, workers: int) -> int:
    """`workers` checked against the model's placement: documents in flight need every weight on a GPU
    (or all on one device); a device map that offloads layers to the CPU or disk (`hf_device_map` values
    "cpu" / "disk" next to GPU ones) moves weights in during each forward, which threads would race on."""
    placement = set(map(str, (getattr(model, "hf_device_map", None) or {}).values()))
    if workers > 1 and placement & {"cpu", "disk"} and len(placement) > 1:
        raise ValueError(f"in_flight {workers} needs a model without CPU or disk offload; its device map "
                         f"places layers on {sorted(placement)}: set in_flight to 1 or give it more GPU memory")
    return workers
