"""normcore.torch.SyncBatchNorm over torch.distributed (gloo on loopback), 2 and 3 processes
started with torch.multiprocessing (the ranks' code: torch_dist_worker.py)."""
import os
import time

import numpy as np
import pytest

from optional_peers import torch

pytestmark = pytest.mark.skipif(torch is None, reason="needs torch (the torch.distributed SyncBatchNorm)")

if torch is not None:
    import torch.multiprocessing as mp

    import normcore.torch as nct
    import torch_dist_worker as worker

TIMEOUT = 120


def launch(tmp_path, world, scenario, **kwargs):
    """Run `scenario` on `world` ranks; the per-rank results (dicts of arrays), or fail with the
    ranks' tracebacks. Every rank must have finished within TIMEOUT seconds."""
    out = tmp_path / scenario
    out.mkdir(exist_ok=True)
    init_file = tmp_path / f"init-{scenario}-{time.monotonic_ns()}"
    ctx = mp.start_processes(worker.run, args=(world, str(init_file), str(out), scenario, kwargs), nprocs=world,
                             join=False, start_method="spawn")
    deadline = time.monotonic() + TIMEOUT
    while not ctx.join(timeout=1):
        if time.monotonic() > deadline:
            for p in ctx.processes:
                p.kill()
            pytest.fail(f"{scenario}: the ranks did not finish within {TIMEOUT} s (a hang)")
    results = []
    for rank in range(world):
        failed = out / f"{scenario}-{rank}.txt"
        if failed.exists():
            pytest.fail(f"rank {rank} of {scenario} raised:\n{failed.read_text()}")
        with np.load(out / f"{scenario}-{rank}.npz") as f:
            results.append(dict(f))
    return results


def single_process(sizes, dtype, steps):
    """One normcore BatchNorm over the whole batch: what every rank's slice must match."""
    m = nct.BatchNorm2d(worker.C, momentum=0.3, dtype=dtype)
    with torch.no_grad():
        m.weight.uniform_(0.5, 1.5, generator=torch.Generator().manual_seed(1))
        m.bias.uniform_(-0.5, 0.5, generator=torch.Generator().manual_seed(2))
    ref = []
    for step in range(steps):
        x, dy = worker.global_batch(sum(sizes), seed=step, dtype=dtype)
        x.requires_grad_()
        y = m(x)
        y.backward(dy)
        ref.append(dict(y=y.detach().numpy(), dx=x.grad.numpy(), dweight=m.weight.grad.numpy().copy(),
                        dbias=m.bias.grad.numpy().copy(), running_mean=m.running_mean.numpy().copy(),
                        running_var=m.running_var.numpy().copy()))
        m.weight.grad = m.bias.grad = None
    m.eval()
    x, _ = worker.global_batch(sum(sizes), seed=99, dtype=dtype)
    return ref, m(x).detach().numpy()


@pytest.mark.parametrize("sizes, dtype, channels_last", [
    ((4, 2), "float64", False),
    ((3, 0, 5), "float64", False),
    ((2, 5, 1), "float32", True),
])
def test_equals_one_batch_norm_over_the_whole_batch(tmp_path, sizes, dtype, channels_last):
    steps = 3
    results = launch(tmp_path, len(sizes), "uneven", sizes=sizes, dtype_name=dtype, channels_last=channels_last,
                     steps=steps)
    ref, ref_eval = single_process(sizes, getattr(torch, dtype), steps)
    tol = dict(rtol=1e-10, atol=1e-12) if dtype == "float64" else dict(rtol=2e-5, atol=2e-6)
    for step in range(steps):
        for rank, r in enumerate(results):
            part = worker.slice_of(list(sizes), rank)
            np.testing.assert_allclose(r[f"y{step}"], ref[step]["y"][part], **tol)
            np.testing.assert_allclose(r[f"dx{step}"], ref[step]["dx"][part], **tol)
            np.testing.assert_allclose(r[f"running_mean{step}"], ref[step]["running_mean"], **tol)
            np.testing.assert_allclose(r[f"running_var{step}"], ref[step]["running_var"], **tol)
        # As torch.nn.SyncBatchNorm: each rank's parameter gradient is its slice's share; their
        # sum is the whole batch's (DistributedDataParallel averages them).
        for name in ("dweight", "dbias"):
            total = sum(r[f"{name}{step}"] for r in results)
            np.testing.assert_allclose(total, ref[step][name], **tol)
    for rank, r in enumerate(results):
        assert int(r["num_batches_tracked"]) == steps
        np.testing.assert_allclose(r["eval"], ref_eval[worker.slice_of(list(sizes), rank)], **tol)


def test_every_rank_holds_the_same_bits(tmp_path):
    results = launch(tmp_path, 3, "uneven", sizes=(3, 0, 5), dtype_name="float32", channels_last=False, steps=2)
    for key in ("running_mean0", "running_var0", "running_mean1", "running_var1"):
        first = results[0][key]
        for r in results[1:]:
            assert r[key].tobytes() == first.tobytes(), key


@pytest.mark.parametrize("kind", ["channels", "dtype", "dim"])
def test_a_refusal_on_one_rank_raises_on_every_rank(tmp_path, kind):
    results = launch(tmp_path, 3, "refusal", bad_rank=1, kind=kind)
    errors = [str(r["error"]) for r in results]
    assert all(errors), errors  # nobody hung, nobody went on
    assert errors[0].startswith("RuntimeError") and "rank(s) [1] refused" in errors[0]
    assert errors[2].startswith("RuntimeError")
    expected = {"channels": "ValueError", "dtype": "TypeError", "dim": "ValueError"}[kind]
    assert errors[1].startswith(expected), errors[1]
    assert all(bool(r["unchanged"]) for r in results)


def ddp_model():
    torch.manual_seed(0)
    return torch.nn.Sequential(torch.nn.Conv2d(3, 4, 3), torch.nn.BatchNorm2d(4), torch.nn.ReLU(),
                               torch.nn.Flatten(), torch.nn.Linear(4 * 4 * 4, 5)).double()


def test_distributed_data_parallel_steps_track_one_process_on_the_whole_batch(tmp_path):
    steps = 3
    results = launch(tmp_path, 2, "ddp", steps=steps)
    model = ddp_model()  # torch's own layers, one process, the whole batch
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    for step in range(steps):
        x, target = worker.ddp_batch(step)
        opt.zero_grad()
        torch.nn.functional.mse_loss(model(x), target).backward()
        opt.step()
        for name, p in model.state_dict().items():
            for r in results:
                np.testing.assert_allclose(r[f"{step}:{name}"], p.numpy(), rtol=1e-9, atol=1e-11, err_msg=name)


def test_outside_a_process_group_it_is_a_batch_norm():
    m = nct.SyncBatchNorm(3)
    ref = torch.nn.BatchNorm2d(3)
    x = torch.randn(4, 3, 5, 5)
    np.testing.assert_allclose(m(x).detach().numpy(), ref(x).detach().numpy(), rtol=1e-5, atol=1e-6)
    assert torch.equal(m.num_batches_tracked, ref.num_batches_tracked)


def test_convert_sync_batchnorm_keeps_the_parameter_objects():
    model = torch.nn.Sequential(torch.nn.Conv2d(3, 4, 1), torch.nn.BatchNorm2d(4), torch.nn.BatchNorm1d(4),
                                torch.nn.SyncBatchNorm(4), torch.nn.GroupNorm(2, 4))
    weight = model[1].weight
    out = nct.convert_sync_batchnorm(model, process_group=None)
    assert out is model and model[1].weight is weight
    assert [type(m).__name__ for m in model] == ["Conv2d", "SyncBatchNorm", "SyncBatchNorm", "SyncBatchNorm",
                                                 "GroupNorm"]
    assert all(isinstance(m, nct.SyncBatchNorm) for m in model[1:4])
    assert type(nct.revert(model)[1]) is torch.nn.SyncBatchNorm
    assert type(nct.convert(torch.nn.SyncBatchNorm(4))) is nct.SyncBatchNorm  # convert takes torch's too


def test_the_readme_torchrun_example(tmp_path):
    """examples/torch/train_ddp.py under torchrun, as the README launches it (its own session, so
    that a hang is killed with every rank)."""
    import signal
    import subprocess
    import sys
    from pathlib import Path

    script = Path(__file__).resolve().parent.parent / "examples" / "torch" / "train_ddp.py"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2", str(script)]
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=tmp_path,
                            start_new_session=True)
    try:
        stdout, stderr = proc.communicate(timeout=TIMEOUT)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        stdout, stderr = proc.communicate()
        pytest.fail(f"torchrun did not finish within {TIMEOUT} s:\n{stdout[-2000:]}\n{stderr[-2000:]}")
    assert proc.returncode == 0, stderr[-3000:]
    assert "step 4: loss" in stdout
    assert "2 ranks, running_mean the same bits on every rank: True" in stdout
