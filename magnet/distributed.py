"""Several processes (torchrun): who this process is, and the few collective operations training needs.

`setup()` joins the process group torchrun describes (RANK, WORLD_SIZE, LOCAL_RANK, MASTER_ADDR/PORT in the
environment): NCCL on CUDA, gloo on the CPU, with a timeout (MAGNET_DIST_TIMEOUT seconds, default 1800), so a
process that dies or hangs makes the others stop with a MagnetError instead of waiting for ever. Without those
variables (or with WORLD_SIZE 1) everything here is a no-op for one process.

Training uses it as DistributedDataParallel does, without wrapping the model: each process computes the
gradients of its share of the examples, and one all-reduce per optimizer step sums them (one flat buffer of
the adapters' gradients); the loss is divided by the count of masked positions over all processes, so the sum
is the gradient of the mean over the whole effective batch (batch x grad_accum x processes).
"""
from __future__ import annotations

import datetime
import os
from dataclasses import dataclass

import torch

from .errors import MagnetError, first_line

TIMEOUT_ENV = "MAGNET_DIST_TIMEOUT"
DEFAULT_TIMEOUT = 1800.0


@dataclass(frozen=True)
class Group:
    """This process's place: rank, world size, local rank (its GPU on its machine)."""
    rank: int = 0
    world: int = 1
    local_rank: int = 0

    @property
    def main(self) -> bool:
        """Rank 0 writes files, renders previews and logs."""
        return self.rank == 0

    def sum_(self, t: torch.Tensor) -> torch.Tensor:
        """Sum `t` over every process, in place (a no-op for one process)."""
        if self.world > 1:
            _collective(lambda: torch.distributed.all_reduce(t, op=torch.distributed.ReduceOp.SUM))
        return t

    def any(self, flag: bool, device) -> bool:
        """Whether `flag` is true in any process (every process gets the same answer)."""
        if self.world == 1:
            return bool(flag)
        t = torch.tensor([1.0 if flag else 0.0], device=device)
        _collective(lambda: torch.distributed.all_reduce(t, op=torch.distributed.ReduceOp.MAX))
        return bool(t.item() > 0)

    def barrier(self) -> None:
        if self.world > 1:
            _collective(torch.distributed.barrier)


def _collective(fn) -> None:
    try:
        fn()
    except RuntimeError as e:     # a peer that died (connection closed) or stopped answering (timeout)
        raise MagnetError(f"another training process stopped (process {current().rank} of {current().world} "
                          f"waited: {first_line(e)}). Look at the other processes' output for the cause; the "
                          f"steps saved so far can be resumed.") from None


def env_world() -> tuple[int, int, int]:
    """(rank, world size, local rank) from torchrun's environment; (0, 1, 0) without it."""
    try:
        world = int(os.environ.get("WORLD_SIZE", "1"))
        rank = int(os.environ.get("RANK", "0"))
        local = int(os.environ.get("LOCAL_RANK", str(rank)))
    except ValueError:
        raise MagnetError("RANK / WORLD_SIZE / LOCAL_RANK must be whole numbers (torchrun sets them): start the "
                          "processes with `torchrun --nproc_per_node=N -m magnet train ...`.") from None
    if world < 1 or not 0 <= rank < world:
        raise MagnetError(f"RANK {rank} is not within WORLD_SIZE {world}: start the processes with torchrun.")
    return rank, world, local


def timeout() -> float:
    text = os.environ.get(TIMEOUT_ENV, "")
    try:
        value = float(text) if text else DEFAULT_TIMEOUT
    except ValueError:
        value = -1.0
    if not value > 0:
        raise MagnetError(f"{TIMEOUT_ENV}={text!r} must be a number of seconds above 0 (default {DEFAULT_TIMEOUT:g}).")
    return value


def setup(device: str | torch.device | None = None) -> Group:
    """Join torchrun's process group when there is one (once; later calls return the same group): NCCL when
    `device` is CUDA (each process on its LOCAL_RANK GPU), else gloo."""
    rank, world, local = env_world()
    if world == 1:
        return Group()
    dist = torch.distributed
    if not dist.is_available():
        raise MagnetError("this PyTorch build has no torch.distributed: train in one process, or install a build "
                          "with distributed support.")
    if not dist.is_initialized():
        cuda = device is not None and torch.device(device).type == "cuda"
        if cuda:
            torch.cuda.set_device(local)
        try:
            dist.init_process_group("nccl" if cuda else "gloo", rank=rank, world_size=world,
                                    timeout=datetime.timedelta(seconds=timeout()))
        except (RuntimeError, ValueError) as e:
            raise MagnetError(f"could not join the other training processes ({first_line(e)}): check "
                              f"MASTER_ADDR/MASTER_PORT and that every process was started (torchrun starts "
                              f"them).") from None
    return current()


def current() -> Group:
    """The group this process is in (one process when none was joined)."""
    dist = torch.distributed
    if not (dist.is_available() and dist.is_initialized()):
        return Group()
    rank, world, local = env_world()
    return Group(dist.get_rank(), dist.get_world_size(), local)


def teardown() -> None:
    dist = torch.distributed
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()


def local_device(device: str | None) -> str | None:
    """The device of this process under torchrun: its LOCAL_RANK GPU when CUDA is asked for (or is the
    default), else `device` as given."""
    rank, world, local = env_world()
    if world == 1:
        return device
    if device in (None, "", "auto", "cuda") and torch.cuda.is_available():
        return f"cuda:{local}"
    return device
