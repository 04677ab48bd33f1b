"""torch.distributed as tinyqa uses it: which process this is, and the few collectives its loops need.

`torchrun --nproc-per-node N script.py ...` sets WORLD_SIZE, RANK and LOCAL_RANK; `init` reads them and
starts the process group: gloo on CPUs; on GPUs nccl for CUDA tensors and gloo beside it for the small CPU
tensors the loop exchanges (a step's summed losses, a stop flag), which nccl alone would refuse. Without torchrun every function here is a no-op
on a world of one, so single-process code needs no branches.
"""
import os
from typing import NamedTuple

import torch
import torch.distributed as dist


class Dist(NamedTuple):
    rank: int
    world: int
    device: str

    @property
    def master(self) -> bool:
        return self.rank == 0


def init(device: str) -> Dist:
    """This process's place in the group; under torchrun with CUDA each process takes its LOCAL_RANK's GPU."""
    world = int(os.environ.get("WORLD_SIZE", 1))
    rank = int(os.environ.get("RANK", 0))
    if world > 1:
        cuda = torch.device(device).type == "cuda"
        if cuda:
            device = f"cuda:{int(os.environ.get('LOCAL_RANK', 0))}"
            torch.cuda.set_device(device)
        if not dist.is_initialized():
            dist.init_process_group("cpu:gloo,cuda:nccl" if cuda else "gloo")
    return Dist(rank, world, device)


def barrier(d: Dist):
    if d.world > 1:
        dist.barrier()


def any_rank(d: Dist, flag: bool) -> bool:
    """Whether flag is true on any process (e.g. a stop signal: every rank must stop at the same step)."""
    if d.world == 1:
        return flag
    t = torch.tensor([int(flag)], dtype=torch.int32)
    dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return bool(t.item())


def broadcast(d: Dist, obj):
    """Rank 0's obj on every rank."""
    if d.world == 1:
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def gather(d: Dist, obj) -> list:
    """[obj of rank 0, obj of rank 1, ...] on every rank."""
    if d.world == 1:
        return [obj]
    out = [None] * d.world
    dist.all_gather_object(out, obj)
    return out


def all_reduce_sum(d: Dist, t: torch.Tensor) -> torch.Tensor:
    if d.world > 1:
        dist.all_reduce(t)
    return t


def finish(d: Dist):
    if d.world > 1 and dist.is_initialized():
        dist.barrier()
        dist.destroy_process_group()
