"""Training under torchrun (PyTorch DistributedDataParallel), the same engine:

    torchrun --standalone --nproc_per_node=2 train.py ...

torchrun sets RANK / WORLD_SIZE / LOCAL_RANK / MASTER_ADDR; `init_from_env`
joins the process group (gloo on CPU, nccl on CUDA, one GPU per process). The
engine then asks `current()`: each rank checks and caches the features of its
own shard, trains on its DistributedSampler share of every epoch (gradients
all-reduced by DDP), validates its share of val/; the sums are all-reduced so
every rank holds the global metrics. Only rank 0 prints and writes files.

Every collective has a timeout: a rank that died makes the others fail with a
message instead of hanging (torchrun also stops the group when a rank exits)."""
from __future__ import annotations

import datetime
import os
from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch.utils.data import DistributedSampler

from .errors import UserError

# Long enough for a slow rank's feature pass (the first collective after it
# waits for the slowest rank), short enough that a lost rank is reported.
TIMEOUT = datetime.timedelta(minutes=float(os.environ.get("TL_DIST_TIMEOUT_MIN", "30")))


class RankLost(UserError):
    """Another rank stopped answering (died, was killed, or the network broke)."""


@dataclass(frozen=True)
class Group:
    rank: int
    world: int
    local_rank: int
    backend: str

    @property
    def main(self) -> bool:
        return self.rank == 0


_GROUP: Group | None = None


def launched_by_torchrun() -> bool:
    return "TORCHELASTIC_RUN_ID" in os.environ or ("WORLD_SIZE" in os.environ and "RANK" in os.environ)


def init_from_env(device_name: str = "auto") -> Group | None:
    """Join the process group torchrun described (None when not under torchrun).
    CUDA ranks each take the GPU of their LOCAL_RANK."""
    global _GROUP
    if _GROUP is not None or not launched_by_torchrun():
        return _GROUP
    local_rank = int(os.environ.get("LOCAL_RANK", 0))
    use_cuda = device_name in ("auto", "cuda") and torch.cuda.is_available()
    if use_cuda:
        torch.cuda.set_device(local_rank)  # "cuda" then means this rank's GPU
    backend = "nccl" if use_cuda else "gloo"
    kwargs = {"device_id": torch.device("cuda", local_rank)} if use_cuda else {}
    dist.init_process_group(backend, timeout=TIMEOUT, **kwargs)
    _GROUP = Group(dist.get_rank(), dist.get_world_size(), local_rank, backend)
    return _GROUP


def shutdown() -> None:
    global _GROUP
    if _GROUP is not None:
        try:
            dist.destroy_process_group()
        except Exception:  # a lost peer: nothing left to tidy
            pass
        _GROUP = None


def current() -> Group | None:
    """The process group under torchrun (even of one process: `--nproc_per_node=1` runs,
    and so checks, the DDP path), else None."""
    return _GROUP


def is_main() -> bool:
    return _GROUP is None or _GROUP.rank == 0


def _collective(fn, what: str):
    """Run a collective; a lost peer or a timeout becomes one clear error."""
    try:
        return fn()
    except (RuntimeError, OSError) as e:  # (DistBackendError is a RuntimeError; gloo: ConnectionResetError)
        g = _GROUP
        raise RankLost(f"rank {g.rank if g else '?'}: another training process stopped answering during {what} "
                       f"(it crashed, was killed, or its machine is unreachable; see that rank's error above). "
                       f"Stopping this rank too. Details: {str(e).splitlines()[0][:200] if str(e) else type(e).__name__}"
                       ) from None


def _tensor(values, dtype=torch.float64) -> torch.Tensor:
    t = torch.tensor(values, dtype=dtype)
    return t.cuda() if _GROUP and _GROUP.backend == "nccl" else t


def all_sum(values: list[float], what: str = "an all-reduce") -> list[float]:
    """Element-wise sum over ranks (float64: counts and loss sums stay exact)."""
    t = _tensor(values)
    _collective(lambda: dist.all_reduce(t, op=dist.ReduceOp.SUM), what)
    return t.cpu().tolist()


def any_rank(flags: list[bool], what: str) -> list[bool]:
    """Element-wise OR over ranks (e.g. [stop asked, loss diverged]): every rank takes the same branch."""
    t = _tensor([1.0 if f else 0.0 for f in flags])
    _collective(lambda: dist.all_reduce(t, op=dist.ReduceOp.MAX), what)
    return [bool(v) for v in t.cpu().tolist()]


def gather_objects(obj, what: str) -> list:
    out = [None] * _GROUP.world
    _collective(lambda: dist.all_gather_object(out, obj), what)
    return out


def broadcast_from_main(obj, what: str):
    """Rank 0's value of obj on every rank (e.g. the run folder rank 0 created)."""
    box = [obj]
    _collective(lambda: dist.broadcast_object_list(box, src=0), what)
    return box[0]


def barrier(what: str) -> None:
    _collective(lambda: dist.barrier(), what)


def shard(n: int, g: Group) -> list[int]:
    """This rank's fixed share of range(n) (DistributedSampler, not shuffled:
    rank, rank + world, ...; padded with the first indices so every rank has
    the same count)."""
    return list(DistributedSampler(range(n), num_replicas=g.world, rank=g.rank, shuffle=False))


def epoch_order(n: int, g: Group, seed: int, epoch: int) -> list[int]:
    """This rank's share of one epoch: DistributedSampler's seeded shuffle with
    set_epoch, padded so every rank runs the same number of batches (DDP needs
    that); seed and epoch give the same global permutation the single-process
    engine draws (torch.randperm with a generator seeded seed + epoch)."""
    sampler = DistributedSampler(range(n), num_replicas=g.world, rank=g.rank, shuffle=True, seed=seed)
    sampler.set_epoch(epoch)
    return list(sampler)


def gather_rows(local: torch.Tensor, n: int, g: Group, what: str) -> torch.Tensor:
    """Rows computed by each rank for its `shard` -> all n rows in index order, on every rank."""
    local = local.contiguous().cuda() if g.backend == "nccl" else local.contiguous()  # nccl gathers GPU tensors
    parts = [torch.empty_like(local) for _ in range(g.world)]
    _collective(lambda: dist.all_gather(parts, local), what)
    # rank r's k-th row is index r + k * world: interleave, then drop the padding
    return torch.stack(parts, dim=1).flatten(0, 1)[:n].cpu()


def wrap(module: torch.nn.Module, device: torch.device) -> torch.nn.Module:
    """The trainable part under DDP (gradients averaged across ranks). The
    plain module stays what is saved and evaluated: checkpoints keep today's format."""
    from torch.nn.parallel import DistributedDataParallel as DDP
    ids = [device.index if device.index is not None else torch.cuda.current_device()] if device.type == "cuda" else None
    return DDP(module, device_ids=ids)
