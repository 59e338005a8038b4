"""Run by tests/test_sync_batch_norm.py under `mpiexec -n P`: each rank trains a SyncBatchNorm on
its slice of a batch and checks it against one nc.BatchNorm on the whole batch, computed on
every rank; and that every rank holds bitwise the same statistics and gradients.
Prints one line per rank, "rank R OK" or the failures; exits 1 on any failure."""
import json
import sys

import numpy as np

import normcore as nc
from mpi4py import MPI

comm = MPI.COMM_WORLD
rank, P = comm.Get_rank(), comm.Get_size()
cfg = json.loads(sys.argv[1])
sizes = cfg["sizes"]
assert len(sizes) == P, (sizes, P)
dtype = np.dtype(cfg["dtype"])
C, spatial, steps = cfg["C"], tuple(cfg["spatial"]), cfg["steps"]
tol = 1e-11 if dtype == np.float64 else 1e-5
N = sum(sizes)
lo, hi = sum(sizes[:rank]), sum(sizes[:rank + 1])
failures = []


def close(name, got, want):
    got, want = np.asarray(got, np.float64), np.asarray(want, np.float64)
    if got.shape != want.shape:
        failures.append(f"{name}: shape {got.shape} != {want.shape}")
        return
    scale = max(1.0, float(np.max(np.abs(want)))) if want.size else 1.0
    err = float(np.max(np.abs(got - want))) if want.size else 0.0
    if not err <= tol * scale:
        failures.append(f"{name}: max error {err:.3g} > {tol:g} * {scale:.3g}")


def same_on_every_rank(name, a):
    a = np.ascontiguousarray(a, np.float64).ravel()
    every = np.empty((P, a.size))
    comm.Allgather(a, every)
    if not all(np.array_equal(row, every[0]) for row in every):
        failures.append(f"{name}: differs between ranks")


BN = {0: nc.BatchNorm1d, 1: nc.BatchNorm1d, 2: nc.BatchNorm2d, 3: nc.BatchNorm3d}[len(spatial)]
rng = np.random.default_rng(cfg["seed"])
kwargs = dict(momentum=cfg["momentum"], affine=cfg["affine"], dtype=dtype)
ref = BN(C, **kwargs)
if cfg["affine"]:
    ref.weight[...] = rng.uniform(0.5, 1.5, C)
    ref.bias[...] = rng.normal(size=C)
sync = nc.SyncBatchNorm.from_batch_norm(ref)
assert sync.comm is comm

for step in range(steps):
    x = (rng.normal(size=(N, C) + spatial) * rng.uniform(0.5, 3.0, C).reshape((1, C) + (1,) * len(spatial))
         + cfg["offset"]).astype(dtype)
    dy = rng.normal(size=x.shape).astype(dtype)
    y = sync(x[lo:hi])
    y_ref = ref(x)
    dx = sync.backward(dy[lo:hi])
    dx_ref = ref.backward(dy)
    close(f"step {step} y", y, y_ref[lo:hi])
    close(f"step {step} dx", dx, dx_ref[lo:hi])
    for k in ref.grads:
        close(f"step {step} grad {k}", sync.grads[k], ref.grads[k])
        same_on_every_rank(f"step {step} grad {k}", sync.grads[k])
    for k, v in ref.state_dict().items():
        close(f"step {step} {k}", getattr(sync, k), v)
        same_on_every_rank(f"step {step} {k}", getattr(sync, k))

# A rank refusing its input: every rank raises, and none changes its state, whatever the refusing
# rank raises (not only TypeError / ValueError: issue 12, item 1), in forward and in backward.
class Hostile:
    """An input that raises when viewed as an array (as a torch tensor that requires grad does)."""

    def __array__(self, dtype=None, copy=None):
        raise RuntimeError("this object cannot be viewed as an array")


def refused_everywhere(label, call, own_error):
    before = {k: v.copy() for k, v in sync.state_dict().items()}
    saved, grads = sync._saved, sync.grads
    try:
        call()
        failures.append(f"{label}: a refused input on the last rank raised nothing here")
    except Exception as exc:  # noqa: BLE001 - which one is checked below
        if rank == P - 1:
            if not isinstance(exc, own_error) or "refused their input" in str(exc):
                failures.append(f"{label}: the refusing rank raised {type(exc).__name__}: {exc}")
        elif not (type(exc) is RuntimeError and "refused their input" in str(exc)):
            failures.append(f"{label}: rank {rank} raised {type(exc).__name__}: {exc}")
    for k, v in sync.state_dict().items():
        if not np.array_equal(v, before[k]):
            failures.append(f"{label}: {k} changed by a refused call")
    if sync._saved is not saved or sync.grads is not grads:
        failures.append(f"{label}: the cached forward or the grads changed")


last = rank == P - 1
refused_everywhere("forward, wrong channels", lambda: sync(x[lo:hi, :C - 1] if last else x[lo:hi]), ValueError)
refused_everywhere("forward, RuntimeError", lambda: sync(Hostile() if last else x[lo:hi]), RuntimeError)
refused_everywhere("forward, int dtype", lambda: sync(np.ones((2, C) + spatial, np.int32) if last else x[lo:hi]),
                   TypeError)
refused_everywhere("backward, RuntimeError", lambda: sync.backward(Hostile() if last else dy[lo:hi]), RuntimeError)
refused_everywhere("backward, wrong shape", lambda: sync.backward(dy[lo:hi, :C - 1] if last else dy[lo:hi]),
                   ValueError)
# After the refusals the last good forward still gives its backward.
dx = sync.backward(dy[lo:hi])
close("backward after refusals", dx, ref.backward(dy)[lo:hi])
# The modules still agree after the refusal.
y = sync(x[lo:hi])
close("after a refusal y", y, ref(x)[lo:hi])

# Eval: local, with the running statistics every rank shares.
sync.eval()
ref.eval()
x = rng.normal(size=(N, C) + spatial).astype(dtype)
dy = rng.normal(size=x.shape).astype(dtype)
close("eval y", sync(x[lo:hi]), ref(x)[lo:hi])
close("eval dx", sync.backward(dy[lo:hi]), ref.backward(dy)[lo:hi])

print(f"rank {rank} " + ("OK" if not failures else "FAILED: " + "; ".join(failures)), flush=True)
sys.exit(1 if failures else 0)
