import threading
import time

import pytest

from mechdistill.inflight import in_flight


def test_in_flight_keeps_the_items_order_and_runs_calls_at_once():
    seen_threads, running, peak = set(), [0], [0]
    lock = threading.Lock()

    def slow_square(x: int) -> int:
        with lock:
            running[0] += 1
            peak[0] = max(peak[0], running[0])
            seen_threads.add(threading.get_ident())
        time.sleep(0.02 * (5 - x % 5))  # later items finish first
        with lock:
            running[0] -= 1
        return x * x

    assert list(in_flight(slow_square, range(10), workers=3)) == [x * x for x in range(10)]
    assert peak[0] == 3 and len(seen_threads) == 3


def test_one_worker_runs_in_the_calling_thread():
    caller = threading.get_ident()
    assert list(in_flight(lambda x: (x, threading.get_ident() == caller), [1, 2], workers=1)) == [(1, True), (2, True)]


def test_an_error_surfaces_at_its_item():
    def fail_on_three(x: int) -> int:
        if x == 3:
            raise ValueError("three")
        return x

    out = in_flight(fail_on_three, range(6), workers=2)
    assert [next(out), next(out), next(out)] == [0, 1, 2]
    with pytest.raises(ValueError, match="three"):
        next(out)
    with pytest.raises(ValueError, match="workers"):
        list(in_flight(fail_on_three, [1], workers=0))


def test_documents_in_flight_are_refused_on_a_model_offloaded_to_cpu_or_disk():
    from types import SimpleNamespace

    from mechdistill.inflight import in_flight_workers

    on_gpus = SimpleNamespace(hf_device_map={"model.layers.0": 0, "model.layers.1": 1})
    offloaded = SimpleNamespace(hf_device_map={"model.layers.0": 0, "model.layers.1": "cpu"})
    assert in_flight_workers(on_gpus, 4) == 4 and in_flight_workers(offloaded, 1) == 1
    assert in_flight_workers(SimpleNamespace(), 3) == 3  # no device map: one device
    with pytest.raises(ValueError, match="offload"):
        in_flight_workers(offloaded, 2)
