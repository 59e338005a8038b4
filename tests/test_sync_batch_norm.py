"""SyncBatchNorm: in one process (MPI.COMM_SELF) it is BatchNorm; under `mpiexec -n 2` and
`-n 3`, with uneven and empty ranks, each rank's output, dx, parameter gradients and running
statistics equal those of one BatchNorm on the whole batch, and are the same bits on every rank
(tests/mpi_sync_worker.py). Skipped only where mpi4py or mpiexec is missing; .ci/run installs
both (the "mpi" extra: mpi4py and MPICH's wheel)."""
import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

import normcore as nc

HERE = Path(__file__).resolve().parent


def test_import_normcore_does_not_import_mpi4py():
    code = "import sys, normcore; assert 'mpi4py' not in sys.modules; print(normcore.SyncBatchNorm.__name__)"
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=False)
    assert done.returncode == 0 and done.stdout.strip() == "SyncBatchNorm", done.stderr


def test_missing_mpi4py_names_the_extra():
    code = ("import sys; sys.modules['mpi4py'] = None\n"
            "import normcore as nc\n"
            "try:\n    nc.SyncBatchNorm(3)\nexcept ImportError as e:\n    print(e)\n")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=False)
    assert done.returncode == 0, done.stderr
    assert "pip install mpi4py mpich" in done.stdout


def find_mpiexec():
    """The MPI launcher: $NORMCORE_TEST_MPIEXEC, else the one next to this interpreter (a venv's
    own, installed with its mpi4py, e.g. by MPICH's wheel; often not on PATH), else PATH's."""
    chosen = os.environ.get("NORMCORE_TEST_MPIEXEC")
    if chosen:
        return chosen
    for folder in dict.fromkeys([Path(sys.executable).parent, Path(sys.prefix) / "bin"]):
        for name in ("mpiexec", "mpirun"):
            candidate = folder / name
            if candidate.is_file() and os.access(candidate, os.X_OK):
                return str(candidate)
    return shutil.which("mpiexec") or shutil.which("mpirun")


def oversubscribe_options(version_text):
    """What a launcher needs to start more ranks than there are cores: Open MPI refuses ("There
    are not enough slots available") without --oversubscribe; MPICH needs nothing."""
    if "Open MPI" in version_text or "OpenRTE" in version_text or "PRRTE" in version_text:
        return ["--oversubscribe"]
    return []


def launch_command(mpiexec, ranks):
    done = subprocess.run([mpiexec, "--version"], capture_output=True, text=True, timeout=60, check=False)
    return [mpiexec, *oversubscribe_options(done.stdout + done.stderr), "-n", str(ranks)]


@pytest.mark.parametrize("text, options", [
    ("mpiexec (OpenRTE) 4.1.4\n\nReport bugs to http://www.open-mpi.org/community/help/", ["--oversubscribe"]),
    ("mpirun (Open MPI) 5.0.6", ["--oversubscribe"]),
    ("prterun (PMIx Reference RunTime Environment) 3.0.5 PRRTE", ["--oversubscribe"]),
    ("HYDRA build details:\n    Version:                                 5.0.2", []),
])
def test_oversubscribe_options_per_mpi(text, options):
    assert oversubscribe_options(text) == options


def test_the_mpiexec_next_to_the_interpreter_is_found(tmp_path, monkeypatch):
    """A venv's bin/mpiexec is used even when bin/ is not on PATH (issue 12, item 21)."""
    fake_bin = tmp_path / "bin"
    fake_bin.mkdir()
    launcher = fake_bin / "mpiexec"
    launcher.write_text("#!/bin/sh\n")
    launcher.chmod(0o755)
    monkeypatch.delenv("NORMCORE_TEST_MPIEXEC", raising=False)
    monkeypatch.setattr(sys, "executable", str(fake_bin / "python"))
    monkeypatch.setenv("PATH", "/nonexistent")
    assert find_mpiexec() == str(launcher)


try:  # the tests above need no mpi4py; those below it are marked and skip without it
    from mpi4py import MPI
except ImportError:
    MPI = None
needs_mpi4py = pytest.mark.skipif(MPI is None, reason="mpi4py is not installed (the \"mpi\" extra)")


def one_process(dtype=np.float64, **kwargs):
    return nc.SyncBatchNorm(3, comm=MPI.COMM_SELF, dtype=dtype, **kwargs)


@needs_mpi4py
@pytest.mark.parametrize("shape", [(6, 3), (4, 3, 5), (2, 3, 4, 4), (2, 3, 2, 3, 2)])
@pytest.mark.parametrize("momentum", [0.1, None])
def test_one_process_is_batch_norm(shape, momentum):
    rng = np.random.default_rng(0)
    ref = {2: nc.BatchNorm1d, 3: nc.BatchNorm1d, 4: nc.BatchNorm2d, 5: nc.BatchNorm3d}[len(shape)](
        3, momentum=momentum, dtype=np.float64)
    ref.weight[...] = rng.uniform(0.5, 1.5, 3)
    ref.bias[...] = rng.normal(size=3)
    sync = nc.SyncBatchNorm.from_batch_norm(ref, comm=MPI.COMM_SELF)
    for _ in range(3):
        x = rng.normal(4.0, 2.0, shape)
        dy = rng.normal(size=shape)
        np.testing.assert_allclose(sync(x), ref(x), rtol=0, atol=1e-12)
        np.testing.assert_allclose(sync.backward(dy), ref.backward(dy), rtol=0, atol=1e-12)
        for k in ref.grads:
            np.testing.assert_allclose(sync.grads[k], ref.grads[k], rtol=1e-12, atol=1e-12)
        for k, v in ref.state_dict().items():
            np.testing.assert_allclose(sync.state_dict()[k], v, rtol=1e-13, atol=1e-13)
    sync.eval()
    ref.eval()
    x = rng.normal(size=shape)
    # Eval is BatchNorm's own local path, on running statistics equal to a few ulps.
    np.testing.assert_allclose(sync(x), ref(x), rtol=0, atol=1e-12)
    np.testing.assert_allclose(sync.backward(x), ref.backward(x), rtol=0, atol=1e-12)
    sync.load_state_dict(ref.state_dict())
    np.testing.assert_array_equal(sync(x), ref(x))
    np.testing.assert_array_equal(sync.backward(x), ref.backward(x))


@needs_mpi4py
def test_from_batch_norm_copies_arguments_state_and_mode():
    bn = nc.BatchNorm2d(3, eps=1e-3, momentum=0.3, dtype=np.float32)
    bn(np.random.default_rng(1).normal(size=(4, 3, 2, 2)).astype(np.float32))
    bn.eval()
    sync = nc.SyncBatchNorm.from_batch_norm(bn)
    assert sync.comm is MPI.COMM_WORLD
    assert (sync.eps, sync.momentum, sync.affine, sync.track_running_stats) == (1e-3, 0.3, True, True)
    assert sync.training is False and sync.running_mean.dtype == np.float32
    for k, v in bn.state_dict().items():
        assert np.array_equal(sync.state_dict()[k], v)
    assert sync.running_mean is not bn.running_mean
    with pytest.raises(TypeError, match="BatchNorm1d/2d/3d"):
        nc.SyncBatchNorm.from_batch_norm(nc.InstanceNorm2d(3))


@needs_mpi4py
def test_registry_repr_and_arguments():
    assert nc.get_norm("sync_batch_norm") is nc.SyncBatchNorm
    assert nc.get_norm("SyncBatchNorm") is nc.SyncBatchNorm
    assert "comm size=1" in repr(one_process())
    with pytest.raises(TypeError, match="mpi4py communicator"):
        nc.SyncBatchNorm(3, comm="world")
    with pytest.raises(ValueError, match="num_features"):
        nc.SyncBatchNorm(0, comm=MPI.COMM_SELF)


@needs_mpi4py
def test_bad_input_in_one_process_changes_nothing():
    m = one_process()
    x = np.random.default_rng(2).normal(size=(4, 3, 2, 2))
    m(x)
    m.backward(x)
    before = {k: v.copy() for k, v in m.state_dict().items()}
    saved = m._saved
    for bad, exc, words in [(np.ones((4, 2, 2, 2)), ValueError, "3 channels"),
                            (np.ones((4, 3, 2, 2), np.int32), TypeError, "float32 or float64"),
                            (np.ones(3), ValueError, "expected 2D or 3D or 4D or 5D input"),
                            (np.ones((1, 3)), ValueError, "Expected more than 1 value per channel")]:
        with pytest.raises(exc, match=words):
            m(bad)
    with pytest.raises(ValueError, match="dy must have the shape"):
        m.backward(np.ones((4, 3, 2, 3)))
    m.eps = 0.0  # as BatchNorm: batch statistics need eps > 0
    with pytest.raises(ValueError, match="batch_norm eps must be positive during training"):
        m(x)
    m.eps = 1e-5
    m.running_var.setflags(write=False)  # refused before the collective, so no rank commits
    with pytest.raises(ValueError, match="running_var is read-only"):
        m(x)
    m.running_var.setflags(write=True)
    assert m._saved is saved
    for k, v in m.state_dict().items():
        assert np.array_equal(v, before[k]), k


@needs_mpi4py
def test_empty_batch_on_every_rank_is_batch_norm_s_empty_batch():
    m, ref = one_process(), nc.BatchNorm2d(3, dtype=np.float64)
    x = np.ones((0, 3, 2, 2))
    assert m(x).shape == ref(x).shape == (0, 3, 2, 2)
    assert int(m.num_batches_tracked) == int(ref.num_batches_tracked) == 1
    assert np.array_equal(m.running_mean, ref.running_mean) and np.array_equal(m.running_var, ref.running_var)
    assert m.backward(x).shape == (0, 3, 2, 2)
    assert not m.grads["weight"].any() and not m.grads["bias"].any()
    m.eval()
    assert m(x).shape == (0, 3, 2, 2)


MPIEXEC = find_mpiexec()
needs_mpiexec = pytest.mark.skipif(MPIEXEC is None, reason="no mpiexec next to the interpreter or on PATH")

RUNS = [
    # (ranks, per-rank batch sizes, dtype, spatial dims, momentum, affine)
    (2, [3, 5], "float64", [4, 5], 0.1, True),
    (2, [1, 1], "float32", [3, 3], 0.1, True),
    (3, [4, 0, 2], "float64", [5, 4], None, True),
    (3, [2, 3, 1], "float32", [], 0.1, True),
    (3, [0, 3, 2], "float32", [2, 3, 2], 0.2, False),
    (2, [6, 2], "float32", [7], 0.1, True),
]


@needs_mpiexec
@pytest.mark.parametrize("ranks,sizes,dtype,spatial,momentum,affine", RUNS,
                         ids=[f"n{r[0]}-{'_'.join(map(str, r[1]))}-{r[2]}-{len(r[3]) + 2}d" for r in RUNS])
@needs_mpi4py
def test_ranks_equal_one_batch_norm_on_the_whole_batch(ranks, sizes, dtype, spatial, momentum, affine):
    cfg = dict(sizes=sizes, dtype=dtype, C=4, spatial=spatial, steps=3, seed=ranks * 10 + len(spatial),
               momentum=momentum, affine=affine, offset=20.0 if dtype == "float64" else 3.0)
    env = dict(os.environ, OMP_NUM_THREADS="1", OMPI_ALLOW_RUN_AS_ROOT="1", OMPI_ALLOW_RUN_AS_ROOT_CONFIRM="1")
    # A hang (a rank waiting in a collective for one that raised) fails here rather than stalling.
    done = subprocess.run([*launch_command(MPIEXEC, ranks), sys.executable, str(HERE / "mpi_sync_worker.py"),
                           json.dumps(cfg)], capture_output=True, text=True, env=env, timeout=180, check=False)
    # The ranks print at once: their lines may run together.
    ok = sorted(int(r) for r in re.findall(r"rank (\d+) OK", done.stdout))
    assert done.returncode == 0 and ok == list(range(ranks)) and "FAILED" not in done.stdout, \
        done.stdout + done.stderr
