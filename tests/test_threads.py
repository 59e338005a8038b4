"""Python threads: the kernels release the GIL, different layers in different threads give the
results they give one after the other, and one layer shared by several threads runs its calls
one at a time (each whole), so its running statistics and counters are never torn."""
import copy
import pickle
import sys
import threading
import time

import numpy as np
import pytest

import normcore as nc
from normcore.registry import get_norm


def layers():
    """name -> (module factory, input shape); large enough that the calls of two threads overlap."""
    return {
        "bn_train": (lambda: nc.BatchNorm2d(8), (8, 8, 40, 40)),
        "bn_eval": (lambda: nc.BatchNorm2d(8).eval(), (8, 8, 40, 40)),
        "in": (lambda: nc.InstanceNorm2d(8, affine=True, track_running_stats=True), (8, 8, 40, 40)),
        "gn": (lambda: nc.GroupNorm(4, 8), (8, 8, 40, 40)),
        "ln": (lambda: nc.LayerNorm((40, 40)), (8, 8, 40, 40)),
        "lrn": (lambda: nc.LocalResponseNorm(3), (8, 8, 40, 40)),
        "switchable": (lambda: get_norm("switchable_norm2d")(8), (8, 8, 40, 40)),
    }


def run_steps(m, xs, dys):
    """Forward and backward over the inputs; every output, gradient and the final state."""
    out = []
    for x, dy in zip(xs, dys):
        out.append(m(x))
        out.append(m.backward(dy))
        out.extend(m.grads[k] for k in sorted(m.grads))
    out.extend(v for _, v in sorted(m.state_dict().items()))
    return out


def inputs(shape, seed, steps=3):
    rng = np.random.default_rng(seed)
    xs = [rng.normal(1.0, 2.0, shape).astype(np.float32) for _ in range(steps)]
    dys = [rng.normal(size=shape).astype(np.float32) for _ in range(steps)]
    return xs, dys


@pytest.mark.parametrize("n_threads", [1, 2])
def test_different_layers_in_threads_equal_sequential(n_threads):
    cases = layers()
    data = {name: inputs(shape, seed) for seed, (name, (_, shape)) in enumerate(cases.items())}
    try:
        nc.set_num_threads(n_threads)
        expected = {name: run_steps(make(), *data[name]) for name, (make, _) in cases.items()}
        results = {}
        start = threading.Barrier(len(cases))
        errors = []

        def work(name):
            try:
                m = cases[name][0]()
                start.wait()
                results[name] = run_steps(m, *data[name])
            except BaseException as exc:  # noqa: BLE001 - reported below
                errors.append((name, exc))

        threads = [threading.Thread(target=work, args=(name,)) for name in cases]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
    finally:
        nc.set_num_threads(None)
    assert not errors, errors
    for name in cases:
        assert len(results[name]) == len(expected[name])
        for got, want in zip(results[name], expected[name]):
            assert got.dtype == want.dtype and np.array_equal(got, want, equal_nan=True), name


def progress_during(call, repeats=30):
    """How far a pure-Python counter in the main thread gets while another thread runs `call`.

    The switch interval is raised to 2 s, so the interpreter never takes the GIL from a thread
    that holds it within one call: the counter can only move while the call runs if the call
    releases the GIL itself. Returns the largest count seen; the calls stop at the first one
    that saw progress, or after `repeats` (on a loaded 2-core machine the main thread may find
    no free core during a few milliseconds' call, once or several times in a row).
    """
    counter = [0]
    done = threading.Event()
    seen = []

    def worker():
        try:
            for _ in range(repeats):
                before = counter[0]
                call()
                seen.append(counter[0] - before)
                if seen[-1] > 0:
                    break
        finally:
            done.set()

    old = sys.getswitchinterval()
    sys.setswitchinterval(2.0)
    try:
        t = threading.Thread(target=worker)
        t.start()
        while not done.is_set():
            for _ in range(2000):
                counter[0] += 1
            time.sleep(1e-4)  # releases the GIL: the worker takes it back when it wants it
        t.join()
    finally:
        sys.setswitchinterval(old)
    return max(seen)


def test_kernels_release_the_gil():
    x = np.random.default_rng(0).normal(size=(16, 16, 96, 96)).astype(np.float32)
    # The check itself: pure Python holds the GIL for the whole call, and the counter stands still.
    assert progress_during(lambda: sum(range(300_000))) == 0
    try:
        nc.set_num_threads(1)  # leaves a core free for the main thread
        for name, m in [("bn", nc.BatchNorm2d(16)), ("gn", nc.GroupNorm(4, 16)),
                        ("ln", nc.LayerNorm((96, 96))), ("lrn", nc.LocalResponseNorm(5))]:
            assert progress_during(lambda: m(x)) > 0, f"{name}: the main thread never ran during forward"
            m(x)
            assert progress_during(lambda: m.backward(x)) > 0, f"{name}: never ran during backward"
    finally:
        nc.set_num_threads(None)


@pytest.mark.parametrize("name", ["bn_train", "in", "switchable"])
def test_one_layer_shared_by_threads_updates_state_whole(name):
    """Four threads train one layer on the same batch: the counter and the running statistics
    equal those of the same number of steps taken in one thread, bit for bit."""
    make, shape = layers()[name]
    x = np.random.default_rng(5).normal(2.0, 3.0, shape).astype(np.float32)
    n_threads, steps = 4, 5
    ref = make()
    for _ in range(n_threads * steps):
        y_ref = ref(x)
    shared = make()
    start = threading.Barrier(n_threads)
    outputs, errors = [], []

    def work():
        try:
            start.wait()
            for _ in range(steps):
                outputs.append(shared(x))
        except BaseException as exc:  # noqa: BLE001 - reported below
            errors.append(exc)

    threads = [threading.Thread(target=work) for _ in range(n_threads)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors, errors
    assert len(outputs) == n_threads * steps
    for y in outputs:  # batch statistics: every step's output is the same
        assert np.array_equal(y, y_ref)
    want, got = ref.state_dict(), shared.state_dict()
    assert want.keys() == got.keys()
    for k in want:
        assert np.array_equal(got[k], want[k]), k


def test_shared_layer_in_eval_gives_each_thread_its_own_result():
    m = nc.BatchNorm2d(8)
    m(np.random.default_rng(6).normal(size=(4, 8, 6, 6)).astype(np.float32))
    m.eval()
    xs = [np.random.default_rng(10 + i).normal(size=(8, 8, 40, 40)).astype(np.float32) for i in range(4)]
    expected = [m(x) for x in xs]
    results = [None] * len(xs)
    start = threading.Barrier(len(xs))

    def work(i):
        start.wait()
        for _ in range(3):
            results[i] = m(xs[i])

    threads = [threading.Thread(target=work, args=(i,)) for i in range(len(xs))]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    for got, want in zip(results, expected):
        assert np.array_equal(got, want)


def test_holding_the_lock_pairs_forward_with_backward():
    m = nc.GroupNorm(2, 8)
    shape = (4, 8, 20, 20)
    xs = [np.random.default_rng(20 + i).normal(size=shape).astype(np.float32) for i in range(3)]
    dy = np.random.default_rng(30).normal(size=shape).astype(np.float32)
    expected = []
    for x in xs:
        m(x)
        expected.append(m.backward(dy))
    results = [[] for _ in xs]
    start = threading.Barrier(len(xs))

    def work(i):
        start.wait()
        for _ in range(5):
            with m.lock:
                m(xs[i])
                results[i].append(m.backward(dy))

    threads = [threading.Thread(target=work, args=(i,)) for i in range(len(xs))]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    for got, want in zip(results, expected):
        assert len(got) == 5 and all(np.array_equal(dx, want) for dx in got)


def test_a_waiting_call_blocks_until_the_lock_is_free():
    m = nc.BatchNorm1d(2)
    x = np.random.default_rng(7).normal(size=(6, 2)).astype(np.float32)
    finished = threading.Event()

    def work():
        m(x)
        finished.set()

    with m.lock:
        t = threading.Thread(target=work)
        t.start()
        assert not finished.wait(0.2)  # the other thread's forward waits for the lock
        assert int(m.num_batches_tracked) == 0
    t.join()
    assert finished.is_set() and int(m.num_batches_tracked) == 1


def test_plugin_subclasses_hold_the_lock_too():
    class Doubling(nc.Module):
        def forward(self, x):
            assert self.lock._is_owned()
            return 2 * x

        def backward(self, dy):
            assert self.lock._is_owned()
            return 2 * dy

    m = Doubling()
    assert np.array_equal(m(np.ones(2)), [2.0, 2.0])
    assert np.array_equal(m.backward(np.ones(2)), [2.0, 2.0])
    assert not m.lock._is_owned()


def test_copies_and_pickles_get_their_own_lock():
    m = nc.BatchNorm2d(3)
    x = np.random.default_rng(8).normal(size=(2, 3, 4, 4)).astype(np.float32)
    m(x)
    for other in (copy.deepcopy(m), pickle.loads(pickle.dumps(m))):
        assert other.lock is not m.lock
        assert np.array_equal(other.running_mean, m.running_mean)
        other(x)
        assert int(other.num_batches_tracked) == 2 and int(m.num_batches_tracked) == 1
