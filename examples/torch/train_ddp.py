"""Data-parallel training on CPUs with a synchronised BatchNorm: normcore.torch.SyncBatchNorm
over torch.distributed (gloo), under DistributedDataParallel.

    torchrun --nproc-per-node 2 examples/torch/train_ddp.py
    # across machines: the same command on each, with
    #   --nnodes 2 --node-rank 0|1 --master-addr <host of rank 0> --master-port 29500

Every rank trains on its own slice of each batch; the BatchNorm statistics are those of the
whole batch, bitwise the same on every rank, and so are the weights after each step.
"""
import os

import torch
import torch.distributed as dist
from torch.nn.parallel import DistributedDataParallel

import normcore.torch as nct


def main(steps=5, batch_per_rank=8):
    dist.init_process_group("gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    torch.manual_seed(0)  # the same initial weights on every rank (DDP also broadcasts them)
    model = torch.nn.Sequential(
        torch.nn.Conv2d(3, 16, 3, padding=1), torch.nn.BatchNorm2d(16), torch.nn.ReLU(),
        torch.nn.Conv2d(16, 16, 3, padding=1), torch.nn.BatchNorm2d(16), torch.nn.ReLU(),
        torch.nn.AdaptiveAvgPool2d(1), torch.nn.Flatten(), torch.nn.Linear(16, 10))
    model = nct.convert_sync_batchnorm(nct.convert(model))  # torch's BatchNorm -> normcore's SyncBatchNorm
    net = DistributedDataParallel(model)
    opt = torch.optim.SGD(net.parameters(), lr=0.1)
    data = torch.Generator().manual_seed(1)
    for step in range(steps):
        x = torch.randn(world * batch_per_rank, 3, 16, 16, generator=data)  # the global batch
        labels = torch.randint(0, 10, (world * batch_per_rank,), generator=data)
        mine = slice(rank * batch_per_rank, (rank + 1) * batch_per_rank)
        opt.zero_grad()
        loss = torch.nn.functional.cross_entropy(net(x[mine]), labels[mine])
        loss.backward()
        opt.step()
        if rank == 0:
            print(f"step {step}: loss {loss.item():.4f}", flush=True)
    # The running statistics are the same bits on every rank: gather and compare.
    mean = model[1].running_mean
    every = [torch.empty_like(mean) for _ in range(world)]
    dist.all_gather(every, mean)
    if rank == 0:
        same = all(torch.equal(every[0], m) for m in every)
        print(f"{world} ranks, running_mean the same bits on every rank: {same}", flush=True)
    # Tear down in order: DDP (its reducer holds the process group) before the group, every
    # rank together; a DDP object outliving the group can hang the process at exit.
    del net, opt
    dist.barrier()
    dist.destroy_process_group()


if __name__ == "__main__":
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    main()
