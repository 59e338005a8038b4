"""What synchronising BatchNorm costs: run under MPI, e.g.

    mpiexec -n 2 python benchmarks/sync_batch_norm.py [N_PER_RANK C H W]

Each rank times, on its slice (default (16, 64, 56, 56) float32, one thread per rank), the
collective alone (an Allgather of 2*C + 2 doubles forward, 2*C + 1 backward), a training
forward + backward of nc.SyncBatchNorm, and the same of a local nc.BatchNorm2d; best of 7
repetitions, rank 0 prints them."""
import sys
import time

import numpy as np

import normcore as nc
from mpi4py import MPI

comm = MPI.COMM_WORLD
shape = tuple(int(v) for v in sys.argv[1:5]) or (16, 64, 56, 56)
C = shape[1]
nc.set_num_threads(1)
rng = np.random.default_rng(comm.rank)
x = rng.normal(size=shape).astype(np.float32)
dy = rng.normal(size=shape).astype(np.float32)


def best(f, repeat=7, number=5):
    times = []
    for _ in range(repeat):
        comm.Barrier()
        t = time.perf_counter()
        for _ in range(number):
            f()
        times.append((time.perf_counter() - t) / number)
    return min(times)


fwd_buf, bwd_buf = np.zeros(2 * C + 2), np.zeros(2 * C + 1)
fwd_all, bwd_all = np.empty((comm.size, fwd_buf.size)), np.empty((comm.size, bwd_buf.size))
collectives = best(lambda: (comm.Allgather(fwd_buf, fwd_all), comm.Allgather(bwd_buf, bwd_all)), number=200)
sync, local = nc.SyncBatchNorm(C), nc.BatchNorm2d(C)
t_sync = best(lambda: (sync(x), sync.backward(dy)))
t_local = best(lambda: (local(x), local.backward(dy)))
if comm.rank == 0:
    print(f"{comm.size} ranks, {shape} float32 per rank, 1 thread each; "
          f"{MPI.Get_library_version().splitlines()[0].strip()}")
    print(f"  the two collectives of a step: {collectives * 1e6:.1f} us "
          f"({(fwd_buf.size + bwd_buf.size) * 8} bytes sent per rank)")
    print(f"  SyncBatchNorm forward + backward: {t_sync * 1e3:.2f} ms")
    print(f"  BatchNorm2d forward + backward (local statistics): {t_local * 1e3:.2f} ms")
