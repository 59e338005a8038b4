"""The ranks of the torch.distributed SyncBatchNorm tests (test_torch_distributed.py), started
with torch.multiprocessing over gloo on loopback. Each scenario writes what its rank computed
to out_dir/<scenario>-<rank>.npz (or the error it raised to a .txt) for the test to compare."""
import datetime
import os
import traceback

import numpy as np
import torch
import torch.distributed as dist

import normcore.torch as nct

C = 3
SPATIAL = (4, 3)


def global_batch(n_total, seed=0, dtype=torch.float64):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn((n_total, C, *SPATIAL), generator=g, dtype=dtype) * 2 + 1
    dy = torch.randn((n_total, C, *SPATIAL), generator=g, dtype=dtype)
    return x, dy


def slice_of(sizes, rank):
    start = sum(sizes[:rank])
    return slice(start, start + sizes[rank])


def _init(rank, world, init_file):
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world,
                            timeout=datetime.timedelta(seconds=60))


def uneven(rank, world, sizes, dtype_name, channels_last, steps):
    """Training steps of one SyncBatchNorm on this rank's slice; the outputs, dx, the parameter
    gradients (this rank's share) and the running statistics after each step."""
    dtype = getattr(torch, dtype_name)
    torch.manual_seed(0)
    m = nct.SyncBatchNorm(C, momentum=0.3, dtype=dtype)
    with torch.no_grad():
        m.weight.uniform_(0.5, 1.5, generator=torch.Generator().manual_seed(1))
        m.bias.uniform_(-0.5, 0.5, generator=torch.Generator().manual_seed(2))
    out = {}
    for step in range(steps):
        x, dy = global_batch(sum(sizes), seed=step, dtype=dtype)
        x = x[slice_of(sizes, rank)].clone()
        if channels_last:
            x = x.contiguous(memory_format=torch.channels_last)
        x.requires_grad_()
        y = m(x)
        y.backward(dy[slice_of(sizes, rank)])
        out[f"y{step}"] = y.detach().numpy()
        out[f"dx{step}"] = x.grad.numpy()
        out[f"dweight{step}"] = m.weight.grad.numpy().copy()
        out[f"dbias{step}"] = m.bias.grad.numpy().copy()
        m.weight.grad = m.bias.grad = None
        out[f"running_mean{step}"] = m.running_mean.numpy().copy()
        out[f"running_var{step}"] = m.running_var.numpy().copy()
    out["num_batches_tracked"] = m.num_batches_tracked.numpy().copy()
    out["y_cl"] = np.array(y.is_contiguous(memory_format=torch.channels_last))
    m.eval()
    x, _ = global_batch(sum(sizes), seed=99, dtype=dtype)
    out["eval"] = m(x[slice_of(sizes, rank)]).detach().numpy()
    return out


def refusal(rank, world, bad_rank, kind):
    """bad_rank passes an input its layer refuses (kind: 'channels', 'dtype', 'dim'); every rank
    must raise, and none may change its state."""
    m = nct.SyncBatchNorm(C)
    x = torch.randn(4, C, 5)
    if rank == bad_rank:
        x = {"channels": torch.randn(4, C + 1, 5), "dtype": x.half(), "dim": torch.randn(4, C, 2, 2, 2, 2)}[kind]
    before = {k: v.clone() for k, v in m.state_dict().items()}
    try:
        m(x)
    except Exception as exc:  # noqa: BLE001 - reported to the test
        unchanged = all(torch.equal(before[k], v) for k, v in m.state_dict().items())
        return {"error": np.array(f"{type(exc).__name__}: {exc}"), "unchanged": np.array(unchanged)}
    return {"error": np.array("")}


def ddp(rank, world, steps):
    """DistributedDataParallel training steps of conv + SyncBatchNorm + ReLU + linear on equal
    slices; the parameters after every step."""
    from torch.nn.parallel import DistributedDataParallel

    from test_torch_distributed import ddp_model

    model = nct.convert_sync_batchnorm(ddp_model())
    net = DistributedDataParallel(model)
    opt = torch.optim.SGD(net.parameters(), lr=0.1)
    out = {}
    for step in range(steps):
        x, target = ddp_batch(step)
        n = x.shape[0] // world
        opt.zero_grad()
        loss = torch.nn.functional.mse_loss(net(x[rank * n:(rank + 1) * n]), target[rank * n:(rank + 1) * n])
        loss.backward()
        opt.step()
        for name, p in model.state_dict().items():
            out[f"{step}:{name}"] = p.detach().numpy().copy()
    return out


def ddp_batch(step):
    g = torch.Generator().manual_seed(100 + step)
    return torch.randn(8, 3, 6, 6, generator=g, dtype=torch.float64), torch.randn(8, 5, generator=g,
                                                                                     dtype=torch.float64)


SCENARIOS = {"uneven": uneven, "refusal": refusal, "ddp": ddp}


def run(rank, world, init_file, out_dir, scenario, kwargs):
    """torch.multiprocessing's entry point: one rank of `scenario`."""
    torch.set_num_threads(1)
    _init(rank, world, init_file)
    try:
        result = SCENARIOS[scenario](rank, world, **kwargs)
        np.savez(os.path.join(out_dir, f"{scenario}-{rank}.npz"), **result)
    except Exception:  # noqa: BLE001 - the test reads it
        with open(os.path.join(out_dir, f"{scenario}-{rank}.txt"), "w") as f:
            f.write(traceback.format_exc())
    finally:
        dist.destroy_process_group()
