"""Memory: no leak over many calls, no full-size temporary in a call, and tensors of more than
2**31 elements.

* Leak: 10,000 forward + backward calls leave the resident set flat.
* Peak: with a large input (64 MiB, float32), a forward grows the process by its output plus
  the O(N*C) statistics, and a forward + backward by the output, dx, the parameter gradients
  and those statistics; any temporary as large as x would exceed the bound many times over.
  The peak is the kernel's own high-water mark (VmHWM, reset through /proc/self/clear_refs),
  so it counts what the C kernels and OpenMP threads allocate, not only what NumPy traces
  (tests/test_resources.py checks the latter with tracemalloc).
* Slow (``pytest -m slow``): float32 inputs of a little more than 2**31 elements (8 GiB; about
  17 GiB of memory in all) are normalised exactly as float64 statistics computed chunk by chunk
  say.

The leak and peak measurements run in a fresh interpreter each (subprocess): in the pytest
process, memory freed by earlier tests (kept by malloc), assertion rewriting and captured
output move the resident set by more than the bounds checked here, and nothing but the
measured calls should run between the two readings. The children of the selected tests run
side by side, as many as there are CPUs (every measurement is per process).
"""
import json
import math
import os
import pathlib
import subprocess
import sys
import time

import numpy as np
import pytest

import normcore as nc

MiB = 2**20
ROOT = pathlib.Path(nc.__file__).resolve().parent.parent  # the checkout whose normcore is tested
HAVE_PROC = os.path.exists("/proc/self/statm") and os.path.exists("/proc/self/status")
# The tests that measure resident memory: Linux only (/proc), and left out of the sanitizer run
# (marker rss), where ASan's shadow memory and quarantine change what they measure.
def needs_proc(test):
    return pytest.mark.rss(pytest.mark.skipif(not HAVE_PROC, reason="reads the resident set from /proc (Linux)")(test))

# Code every child process starts with: normcore from ROOT, the layers by name, /proc readers.
CHILD_PRELUDE = r'''
import gc, json, os, resource, sys, time
import numpy as np
import normcore as nc


def switchable():
    from normcore.plugins import switchable as sw
    return sw


def make_layer(kind, shape):
    C = shape[1]
    if kind == "bn_train":
        return nc.BatchNorm2d(C)
    if kind == "bn_eval":
        m = nc.BatchNorm2d(C).eval()
        m.running_mean[...] = 0.1
        m.running_var[...] = 2.0
        return m
    if kind == "in":
        return nc.InstanceNorm2d(C, affine=True, track_running_stats=True)
    if kind == "gn":
        return nc.GroupNorm(4 if C % 4 == 0 else 1, C)
    if kind == "ln":
        return nc.LayerNorm(shape[-1])
    if kind == "ln2":
        return nc.LayerNorm(shape[-2:])
    if kind == "lrn":
        return nc.LocalResponseNorm(5)
    if kind == "sn":
        return switchable().SwitchableNorm2d(C)
    raise ValueError(kind)


def make_data(shape, layout="contiguous"):
    x = np.empty(shape, np.float32)
    np.random.default_rng(0).random(dtype=np.float32, out=x)
    x *= 4.0
    x -= 1.0
    dy = np.full(shape, 0.5, np.float32)
    dy.reshape(-1)[::3] = -1.0
    if layout == "channels_last":
        perm = (0, *range(2, len(shape)), 1)
        x = np.moveaxis(np.ascontiguousarray(x.transpose(perm)), -1, 1)
    return x, dy


def rss():
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def status():
    """VmRSS and VmHWM in bytes."""
    out = {}
    with open("/proc/self/status") as f:
        for line in f:
            key = line.split(":")[0]
            if key in ("VmRSS", "VmHWM"):
                out[key] = int(line.split()[1]) * 1024
    return out


args = json.loads(sys.argv[1])
if args.get("threads"):
    nc.set_num_threads(args["threads"])
'''

LEAK_CHILD = CHILD_PRELUDE + r'''
result = {}
for kind, shape, layout in args["layers"]:
    shape = tuple(shape)
    m = make_layer(kind, shape)
    x, dy = make_data(shape, layout)
    for _ in range(args["warmup"]):
        m(x)
        m.backward(dy)
    gc.collect()
    r0, o0, t0 = rss(), len(gc.get_objects()), time.perf_counter()
    for _ in range(args["calls"]):
        m(x)
        m.backward(dy)
    seconds = time.perf_counter() - t0
    gc.collect()
    label = f"{kind} {shape}" + (" channels-last" if layout != "contiguous" else "")
    result[label] = {"growth": rss() - r0, "objects": len(gc.get_objects()) - o0, "seconds": seconds}
print(json.dumps(result))
'''


def run_child(code, args, env_extra=None, timeout=600):
    """Run `code` in a fresh interpreter on the normcore checkout under test; its last stdout
    line is JSON."""
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join([str(ROOT), *filter(None, [env.get("PYTHONPATH")])])
    # Several children run at once (see `children`): OpenMP threads that spin while they wait
    # would slow them all down. The wait policy changes no allocation.
    env.setdefault("OMP_WAIT_POLICY", "passive")
    env.update(env_extra or {})
    argv = [sys.executable, "-c", code, json.dumps(args)]
    if os.path.exists("/bin/sh"):
        # Linux keeps ru_maxrss across exec: a child exec'd straight from pytest (hundreds of MiB
        # with torch loaded) would start with pytest's peak. A shell in between, which forks the
        # child rather than exec'ing it, gives the child a peak of its own.
        argv = ["/bin/sh", "-c", '"$@"; exit $?', "sh", *argv]
    proc = subprocess.run(argv, env=env, cwd=str(ROOT),
                          capture_output=True, text=True, timeout=timeout, check=False)
    assert proc.returncode == 0, f"child failed (rc {proc.returncode}):\n{proc.stdout}\n{proc.stderr}"
    return json.loads(proc.stdout.strip().splitlines()[-1])


LEAK_SHAPE = (4, 8, 8, 8)
LEAK_LAYERS = ["bn_train", "bn_eval", "in", "gn", "ln2", "lrn", "sn"]
LEAK_WARMUP = 1_000
LEAK_CALLS = 10_000
# The paths the small inputs do not take: the OpenMP ones (65536 values and more, 2 threads:
# parallel regions, per-thread scratch), channels-last input, and BatchNorm's row statistics
# on the heap (more than 256 rows of (n, c)); 1,000 calls each after 300.
OTHER_PATH_LAYERS = [("bn_train", (4, 16, 32, 32), "contiguous"), ("gn", (4, 16, 32, 32), "channels_last"),
                     ("lrn", (4, 16, 32, 32), "contiguous"), ("ln", (4, 16384), "contiguous"),
                     ("bn_train", (64, 8, 2, 2), "contiguous"), ("bn_train", LEAK_SHAPE, "channels_last"),
                     ("in", LEAK_SHAPE, "channels_last")]
OTHER_PATH_CALLS = 1_000

PEAK_CHILD = CHILD_PRELUDE + r'''
def clear_refs_works():
    """Whether writing 5 to /proc/self/clear_refs resets VmHWM to VmRSS (Linux >= 4.0)."""
    try:
        block = np.ones(32 * 2**20, np.uint8)  # raise the high-water mark by 32 MiB ...
        del block                              # ... and return it
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
    except OSError:
        return False
    s = status()
    return s["VmHWM"] - s["VmRSS"] < 8 * 2**20


def maxrss():
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # KiB on Linux


shape = tuple(args["shape"])
m = make_layer(args["kind"], shape)
x, dy = make_data(shape)
if args.get("reversed"):
    x = x[..., ::-1]  # not contiguous: the layers work on (and keep) a contiguous copy
use_clear_refs = clear_refs_works() and not args.get("force_fallback")
if use_clear_refs:
    warm = x                            # the peak is reset after the warm-up
else:
    warm = x[: max(1, shape[0] // 16)]  # ru_maxrss cannot be reset: keep the warm-up peak low
y = m(warm)  # the first calls may allocate once (imports, thread team, malloc arenas)
dx = m.backward(dy[: warm.shape[0]])
y = m(warm)
dx = m.backward(dy[: warm.shape[0]])
del y, dx
gc.collect()
if use_clear_refs:
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")
    s = status()
    base, prior_peak = s["VmRSS"], s["VmHWM"]
    peak = lambda: status()["VmHWM"]
else:
    base, prior_peak = rss(), maxrss()
    peak = maxrss
t0 = time.perf_counter()
y = m(x)
fwd = peak() - base
dx = m.backward(dy)
both = peak() - base
seconds = time.perf_counter() - t0
print(json.dumps(dict(method="clear_refs" if use_clear_refs else "ru_maxrss", x=x.nbytes, y=y.nbytes,
                      dx=dx.nbytes, grads=sum(g.nbytes for g in m.grads.values()), forward=fwd,
                      forward_backward=both, prior_peak=prior_peak - base, seconds=seconds)))
'''


# 64 MiB of float32 each.
PEAK_CASES = {
    "bn_train": ("bn_train", (16, 64, 128, 128)),
    "bn_eval": ("bn_eval", (16, 64, 128, 128)),
    "in": ("in", (16, 64, 128, 128)),
    "gn": ("gn", (16, 64, 128, 128)),
    "ln_few_rows": ("ln", (64, 262144)),
    "ln_many_rows": ("ln", (262144, 64)),
    "lrn": ("lrn", (16, 64, 128, 128)),
    "sn": ("sn", (16, 64, 128, 128)),
}
# MALLOC_MMAP_THRESHOLD_: every allocation of 64 KiB or more gets fresh pages from mmap and
# returns them on free. Otherwise glibc raises its threshold after the first free of a big
# block and serves the next one from heap pages that are already resident, so a temporary
# allocated in the warm-up calls could hide in the measured call.
PEAK_ENV = {"MALLOC_MMAP_THRESHOLD_": "65536"}


def child_job(key):
    """(code, args, env) of the child process a test reads, by key."""
    what = key[0]
    if what == "leak":
        return LEAK_CHILD, {"layers": [(key[1], LEAK_SHAPE, "contiguous")], "warmup": LEAK_WARMUP,
                            "calls": LEAK_CALLS}, None
    if what == "other_paths":
        return LEAK_CHILD, {"layers": OTHER_PATH_LAYERS, "warmup": 300, "calls": OTHER_PATH_CALLS,
                            "threads": 2}, None
    if what == "peak":  # ("peak", case, threads, option)
        kind, shape = PEAK_CASES[key[1]]
        return PEAK_CHILD, {"kind": kind, "shape": shape, "threads": key[2], key[3]: True}, PEAK_ENV
    raise ValueError(key)


def leak_key(kind):
    return ("leak", kind)


def peak_key(case, threads, option="-"):
    return ("peak", case, threads, option)


# The child each selected test reads, so that all can be started at once.
KEY_OF_TEST = {
    "test_no_leak_over_10000_calls": lambda p: leak_key(p["kind"]),
    "test_no_leak_on_the_other_kernel_paths": lambda p: ("other_paths",),
    "test_peak_memory_is_output_plus_statistics": lambda p: peak_key(p["case"], p["threads"]),
    "test_peak_memory_measured_without_clear_refs": lambda p: peak_key("bn_train", 1, "force_fallback"),
    "test_peak_measurement_sees_a_copy_of_the_input": lambda p: peak_key("bn_train", 1, "reversed"),
}


class Children:
    """The child processes of the selected tests, run a few at a time (as many as there are
    CPUs, at most 4) from the first test on; each test waits for its own. The measurements are
    per process (resident set, high-water mark), so running side by side changes none of them,
    only the wall time (about half on two CPUs)."""

    def __init__(self, keys):
        from concurrent.futures import ThreadPoolExecutor

        self.pool = ThreadPoolExecutor(max_workers=max(1, min(4, os.cpu_count() or 1)))
        self.futures = {}
        # The longest first: the 10,000 SwitchableNorm calls, then the multi-layer leak child.
        for key in sorted(keys, key=lambda k: (k != leak_key("sn"), k[0] != "other_paths")):
            self.submit(key)

    def submit(self, key):
        if key not in self.futures:
            code, args, env = child_job(key)
            self.futures[key] = self.pool.submit(run_child, code, args, env)
        return self.futures[key]

    def result(self, key):
        return self.submit(key).result()

    def close(self):
        for f in self.futures.values():
            f.cancel()
        self.pool.shutdown(wait=True)


@pytest.fixture(scope="module")
def children(request):
    keys = []
    for item in request.session.items:
        make_key = KEY_OF_TEST.get(getattr(item, "originalname", None))
        if make_key is not None and item.module is request.module:
            callspec = getattr(item, "callspec", None)
            keys.append(make_key(callspec.params if callspec else {}))
    runner = Children(keys)
    yield runner
    runner.close()


# -- leak -------------------------------------------------------------------------------------
# 4 MiB over 10,000 calls: 400 bytes a call. Leaking the output (8 KiB here) or any per-call
# buffer of 50 doubles would be caught; malloc's arenas may grow by a few pages once.
LEAK_BOUND = 4 * MiB
# Python containers created and kept per call (a cache that keeps growing).
LEAK_OBJECTS = 100


def check_leaks(result, calls, bound=LEAK_BOUND):
    for label, r in result.items():
        assert r["growth"] < bound, (
            f"{label}: resident set grew by {r['growth'] / MiB:.2f} MiB over {calls} forward+backward calls "
            f"(after the warm-up calls)")
        assert r["objects"] < LEAK_OBJECTS, f"{label}: {r['objects']} more Python objects after {calls} calls"


@needs_proc
@pytest.mark.parametrize("kind", LEAK_LAYERS)
def test_no_leak_over_10000_calls(kind, children):
    """1,000 warm-up calls, then the resident set before and after 10,000 more forward +
    backward calls on (4, 8, 8, 8) (SwitchableNorm, whose statistics are combined in NumPy,
    takes longest: about 0.7 ms a call)."""
    check_leaks(children.result(leak_key(kind)), LEAK_CALLS)


@needs_proc
def test_no_leak_on_the_other_kernel_paths(children):
    check_leaks(children.result(("other_paths",)), OTHER_PATH_CALLS)


# -- peak -------------------------------------------------------------------------------------
# Fixed slack: Python and NumPy bookkeeping, the per-call coefficient arrays, page rounding.
PEAK_SLACK = 1 * MiB
# Per thread: LocalResponseNorm's scratch (256 KiB a thread, pyx/lrn.pxi) and a thread's stack
# and malloc arena pages first touched in the call.
PEAK_PER_THREAD = MiB // 2
# Per normalised row (N*C rows for the channel norms, the rows of LayerNorm): the saved
# statistics (mean and rstd in float64) of the new forward while the previous forward's are
# still held, and the per-row sums of the backward. 16 bytes a row are the statistics proper
# (LayerNorm with many rows: 4 MiB here); 32 bytes leave room for a second such array.
PEAK_PER_ROW = 32


def stat_rows(kind, shape):
    return math.prod(shape[:-1]) if kind.startswith("ln") else shape[0] * shape[1]


def layer_norm_column_partials(shape):
    """LayerNorm's backward keeps partial column sums of dweight and dbias per chunk of rows:
    2 float64 per column and chunk, chunks of at least 64 rows, at most 64 of them
    (pyx/layer_rows.pxi); one chunk writes dweight and dbias directly."""
    R, L = math.prod(shape[:-1]), shape[-1]
    return 16 * L * min(64, R // 64) if R > 64 else 0


def peak_result(children, key):
    r = children.result(key)
    # The high-water mark is max(what the measured calls reached, what came before): it says
    # nothing if what came before (the warm-up, with ru_maxrss) reaches half the output's size.
    if r["prior_peak"] >= r["y"] // 2:
        pytest.skip(f"the peak could not be reset ({r['method']}): {r['prior_peak'] / MiB:.1f} MiB above the "
                    "resident set before the measured calls")
    return r


def check_peak(case, threads, r):
    kind, shape = PEAK_CASES[case]
    allowance = PEAK_SLACK + threads * PEAK_PER_THREAD + PEAK_PER_ROW * stat_rows(kind, shape)
    if kind.startswith("ln"):
        allowance += 4 * shape[-1]  # the copy of the float32 weight the forward keeps for its backward
    fwd_extra = r["forward"] - r["y"]
    assert r["forward"] <= r["y"] + allowance, (
        f"{case}, {threads} thread(s): forward grew the process by {r['forward'] / MiB:.2f} MiB for an output "
        f"of {r['y'] / MiB:.2f} MiB: {fwd_extra / MiB:.2f} MiB more, allowed {allowance / MiB:.2f} MiB "
        f"({r['method']})")
    # Parameter gradients: summed in float64 (2x their float32 bytes) then cast, next to the
    # previous call's, as tests/test_resources.py allows.
    bound = r["y"] + r["dx"] + 3 * r["grads"] + allowance
    if kind.startswith("ln"):
        bound += layer_norm_column_partials(shape)
    both_extra = r["forward_backward"] - r["y"] - r["dx"]
    assert r["forward_backward"] <= bound, (
        f"{case}, {threads} thread(s): forward + backward grew the process by {r['forward_backward'] / MiB:.2f} "
        f"MiB for y and dx of {(r['y'] + r['dx']) / MiB:.2f} MiB: {both_extra / MiB:.2f} MiB more, allowed "
        f"{(bound - r['y'] - r['dx']) / MiB:.2f} MiB ({r['method']})")


@needs_proc
@pytest.mark.parametrize("threads", [1, 2], ids=["1thread", "2threads"])
@pytest.mark.parametrize("case", PEAK_CASES)
def test_peak_memory_is_output_plus_statistics(case, threads, children):
    check_peak(case, threads, peak_result(children, peak_key(case, threads)))


@needs_proc
def test_peak_memory_measured_without_clear_refs(children):
    """The fallback where /proc/self/clear_refs cannot reset VmHWM: warm-up on a slice of x
    (1/16), then the process's ru_maxrss."""
    r = peak_result(children, peak_key("bn_train", 1, "force_fallback"))
    assert r["method"] == "ru_maxrss"
    check_peak("bn_train", 1, r)


@needs_proc
def test_peak_measurement_sees_a_copy_of_the_input(children):
    """The measurement itself: a reversed (non-contiguous) x is copied to rows by the forward
    (and kept for the backward), and that copy shows up in the measured peak."""
    r = children.result(peak_key("bn_train", 1, "reversed"))
    assert r["forward"] >= r["y"] + 0.95 * r["x"], r
    with pytest.raises(AssertionError, match="forward grew the process"):
        check_peak("bn_train", 1, r)


# -- more than 2**31 elements -----------------------------------------------------------------
PERIOD = 1_000_003  # a prime: every row of W values starts at another phase of the pattern


def _fill(x, W):
    """x[i] = B[i % PERIOD] + offset(chunk): a random pattern whose period divides no row
    length used here (every row of W differs from every other, and a row read from a wrong
    place would not normalise to the same values), shifted by a per-chunk offset."""
    chunk = 512 * W
    base = np.random.default_rng(0).standard_normal(PERIOD).astype(np.float32)
    ext = np.concatenate([base] * (chunk // PERIOD + 2))
    for j, s in enumerate(range(0, x.size, chunk)):
        o = s % PERIOD
        e = min(s + chunk, x.size)
        np.add(ext[o:o + e - s], np.float32(((j * 37) % 11 - 5) * 0.1), out=x[s:e])


def _row_moments(x, W):
    """float64 (mean, M2) of every row of W values of x (flat), chunk by chunk."""
    chunk = 512 * W
    mean = np.empty(x.size // W)
    m2 = np.empty(x.size // W)
    for s in range(0, x.size, chunk):
        c = x[s:s + chunk].reshape(-1, W).astype(np.float64)
        rows = slice(s // W, s // W + c.shape[0])
        mean[rows] = c.mean(axis=1)
        c -= mean[rows, None]
        m2[rows] = np.einsum("ij,ij->i", c, c)
    return mean, m2


def _merge(mean, m2, count, groups):
    """(mean, M2, count) of `groups` runs of consecutive rows of `count` values each (float64,
    Chan's formula)."""
    mean = mean.reshape(groups, -1)
    m2 = m2.reshape(groups, -1)
    gmean = mean.mean(axis=1)
    gm2 = m2.sum(axis=1) + count * ((mean - gmean[:, None]) ** 2).sum(axis=1)
    return gmean, gm2, count * mean.shape[1]


def _check_rows(x, out, W, center, scale, what, rtol=2e-6, atol=2e-6):
    """out == (x - center[row]) * scale[row] for every row of W values, chunk by chunk in
    float64; returns the largest error."""
    chunk = 512 * W
    x_flat, out_flat = x.reshape(-1), out.reshape(-1)
    worst = 0.0
    for s in range(0, x_flat.size, chunk):
        c = x_flat[s:s + chunk].reshape(-1, W).astype(np.float64)
        rows = slice(s // W, s // W + c.shape[0])
        c -= center[rows, None]
        c *= scale[rows, None]  # the expected values
        got = out_flat[s:s + chunk].reshape(-1, W)
        err = np.abs(got - c)
        bad = err > atol + rtol * np.abs(c)
        if bad.any():
            i, j = np.argwhere(bad)[0]
            pytest.fail(f"{what}: at flat index {s + i * W + j} (row {rows.start + i}): got {got[i, j]!r}, "
                        f"expected {c[i, j]!r}")
        worst = max(worst, float(err.max()))
    return worst


def check_large_layers(H, W):
    """x of 4 * H * W float32 values (rows of W; H rows per (n, c) of the (2, 2, H, W) view)
    through BatchNorm2d (forward, running statistics, backward), InstanceNorm2d,
    GroupNorm(1, 4), LayerNorm(W) and LayerNorm over all values at once, against float64
    statistics of the same x computed chunk by chunk (the outputs are views; one at a time).
    Returns {step: seconds} and the largest forward error."""
    import gc

    times, worst = {}, 0.0
    eps = 1e-5
    t0 = time.perf_counter()
    n = 4 * H * W
    x = np.empty(n, np.float32)
    _fill(x, W)
    mean_r, m2_r = _row_moments(x, W)  # per row of W values
    R = n // W
    times["fill x, float64 row moments"] = time.perf_counter() - t0

    def per_row(gmean, gm2, gcount, index):
        """Per-row center and scale from group moments; index: the group of every row."""
        return gmean[index], 1.0 / np.sqrt(gm2[index] / gcount + eps)

    # BatchNorm2d on (2, 2, H, W): channel c is rows (n, c) = c and 2 + c.
    t0 = time.perf_counter()
    shape = (2, 2, H, W)
    inst_mean, inst_m2, inst_n = _merge(mean_r, m2_r, W, 4)  # per (n, c)
    order = [0, 2, 1, 3]  # (0, c0), (1, c0), (0, c1), (1, c1)
    ch_mean, ch_m2, ch_n = _merge(inst_mean[order], inst_m2[order], inst_n, 2)
    channel_of_row = np.tile(np.repeat(np.arange(2), H), 2)
    bn = nc.BatchNorm2d(2)
    y = bn(x.reshape(shape))
    worst = max(worst, _check_rows(x, y, W, *per_row(ch_mean, ch_m2, ch_n, channel_of_row), "BatchNorm2d y"))
    np.testing.assert_allclose(bn.running_mean, 0.1 * ch_mean, rtol=1e-5, atol=1e-7)
    np.testing.assert_allclose(bn.running_var, 0.9 + 0.1 * ch_m2 / (ch_n - 1), rtol=1e-5)
    del y
    gc.collect()
    # Backward with dy = x (no second input of that size): dx = rstd * (g - mean(g) - xhat *
    # mean(g * xhat)) with g = x is (x - mean) * rstd * eps / (var + eps).
    dx = bn.backward(x.reshape(shape))
    var = ch_m2 / ch_n
    _check_rows(x, dx, W, ch_mean[channel_of_row], (eps / (var + eps) / np.sqrt(var + eps))[channel_of_row],
                "BatchNorm2d dx (dy = x)", rtol=1e-4, atol=1e-10)
    del dx, bn
    gc.collect()
    times["BatchNorm2d forward + backward"] = time.perf_counter() - t0

    # InstanceNorm2d on the same view: 4 instances, the last one beyond 3/4 of x.
    t0 = time.perf_counter()
    y = nc.InstanceNorm2d(2)(x.reshape(shape))
    worst = max(worst, _check_rows(x, y, W, *per_row(inst_mean, inst_m2, inst_n, np.repeat(np.arange(4), H)),
                                   "InstanceNorm2d y"))
    del y
    gc.collect()
    times["InstanceNorm2d forward"] = time.perf_counter() - t0

    # GroupNorm(1, 4) on (1, 4, H, W): one group of all the values.
    t0 = time.perf_counter()
    all_mean, all_m2, all_n = _merge(mean_r, m2_r, W, 1)
    everything = np.zeros(R, np.intp)
    y = nc.GroupNorm(1, 4)(x.reshape(1, 4, H, W))
    worst = max(worst, _check_rows(x, y, W, *per_row(all_mean, all_m2, all_n, everything), "GroupNorm(1, 4) y"))
    del y
    gc.collect()
    times["GroupNorm forward"] = time.perf_counter() - t0

    # LayerNorm(W) on (4 * H, W): many rows.
    t0 = time.perf_counter()
    y = nc.LayerNorm(W)(x.reshape(R, W))
    worst = max(worst, _check_rows(x, y, W, mean_r, 1.0 / np.sqrt(m2_r / W + eps), "LayerNorm(W) y"))
    del y
    gc.collect()
    times["LayerNorm(W) forward"] = time.perf_counter() - t0

    # LayerNorm over all values: one row.
    t0 = time.perf_counter()
    y = nc.LayerNorm(n, elementwise_affine=False)(x.reshape(1, n))
    worst = max(worst, _check_rows(x, y, W, *per_row(all_mean, all_m2, all_n, everything), "LayerNorm(all) y"))
    del y
    gc.collect()
    times["LayerNorm(all values) forward"] = time.perf_counter() - t0
    return times, worst


def test_large_tensor_checks_at_small_scale():
    """The checks of the slow test below, on 4 * 256 * 96 values (8 chunks of 512 rows)."""
    check_large_layers(256, 96)


@pytest.mark.slow
def test_more_than_2_31_elements():
    """2**31 + 2**22 float32 values (H = 2**14 rows of W = 2**15 + 64 per (n, c)): x and one
    output of 8 GiB each, about 17 GiB in all; several minutes."""
    H, W = 2**14, 2**15 + 64
    n = 4 * H * W
    assert n > 2**31
    needed = 2 * n * 4 + 2**30
    avail = os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    if avail < needed:
        pytest.skip(f"needs about {needed / 2**30:.1f} GiB of free memory, {avail / 2**30:.1f} GiB free")
    t0 = time.perf_counter()
    times, worst = check_large_layers(H, W)
    print("\n" + "\n".join(f"  {k}: {v:.1f} s" for k, v in times.items())
          + f"\n  total {time.perf_counter() - t0:.1f} s; largest |error| of a forward output {worst:.2e}")
