"""torch.distributed as tinyqa uses it: which process this is, and the few collectives its loops need.

`torchrun --nproc-per-node N script.py ...` sets WORLD_SIZE, RANK and LOCAL_RANK; `init` reads them and
starts the process group: gloo on CPUs; on GPUs nccl for CUDA tensors and gloo beside it for the small CPU
tensors the loop exchanges (a step's summed losses, a stop flag), which nccl alone would refuse. Without torchrun every function here is a no-op
on a world of one, so single-process code needs no branches.

`balance` splits work without any exchange: a pure function of the items' costs, so every rank computes the
same split (evaluate.py's shards). `restart_count` says which attempt this is when torchrun restarts a group
(--max-restarts).
"""
import heapq
import os
import sys
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
        if restart_count() and os.environ.get("TORCHELASTIC_USE_AGENT_STORE") == "True" and rank == 0:
            print("notice: torchrun restarted this group over the store its agent shares with the workers, which "
                  "still holds the last attempt's keys (pytorch#135712): if the group does not form, run torchrun "
                  "with --rdzv-backend c10d and TORCH_DISABLE_SHARE_RDZV_TCP_STORE=1", file=sys.stderr, flush=True)
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


def gather_to_master(d: Dist, obj):
    """[obj of rank 0, obj of rank 1, ...] on rank 0, None on the others: what only rank 0 writes (evaluation's
    predictions, a chunk at a time) is not copied to every rank."""
    if d.world == 1:
        return [obj]
    out = [None] * d.world if d.master else None
    dist.gather_object(obj, out, dst=0)
    return out


def balance(costs, world: int) -> list:
    """The rank of each item, so that the ranks' summed costs are close: the costliest item first, each onto
    the least-loaded rank (Graham's LPT rule: at most 4/3 of the best split). Ties go to the earlier item and
    the lower rank, so the split is a pure function of costs and world and every rank computes the same one.
    Worked example, costs (5, 3, 3, 2, 2) on 2 ranks: 5 -> 0, 3 -> 1, 3 -> 1 (6 after it, 5 on rank 0),
    2 -> 0, 2 -> 1: ranks (0, 1, 1, 0, 1), loads 7 and 8."""
    loads = [(0, r) for r in range(world)]  # a heap of (load, rank): the least loaded, then the lowest rank
    owner = [0] * len(costs)
    for i in sorted(range(len(costs)), key=lambda i: (-costs[i], i)):
        load, r = heapq.heappop(loads)
        owner[i] = r
        heapq.heappush(loads, (load + costs[i], r))
    return owner


def restart_count() -> int:
    """How many times torchrun has restarted this group (0 on the first attempt, and without torchrun)."""
    return int(os.environ.get("TORCHELASTIC_RESTART_COUNT", 0))


def all_reduce_sum(d: Dist, t: torch.Tensor) -> torch.Tensor:
    if d.world > 1:
        dist.all_reduce(t)
    return t


def finish(d: Dist):
    if d.world > 1 and dist.is_initialized():
        dist.barrier()
        dist.destroy_process_group()
