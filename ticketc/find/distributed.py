"""`ticketc find` under torchrun: the ranks of one search, and the few collectives it needs.

torchrun (`torchrun --nproc-per-node N -m ticketc find ...`) starts one process per rank and
sets RANK / WORLD_SIZE / MASTER_ADDR in their environment; `from_environment` joins them into
one process group (gloo on CPU). The search then works as in one process, with these rules:

- every rank trains every member on its shard of each global batch, `batch[rank::world]` (the
  interleaving `torch.utils.data.DistributedSampler` uses), and DistributedDataParallel averages
  the gradients, so the global batch and the schedule are those of the single-process run;
- rank 0 alone reads and writes the run directory (atomically, as in one process); what the
  others need from it (the level's masks and starting weights, a checkpoint to resume from,
  the ticket) is computed on rank 0 and broadcast;
- an error on rank 0 (a folder that holds another run, ...) is broadcast too, so every rank
  stops with the same one-line message instead of waiting for the others forever.

A kill of any rank ends the torchrun job (its other ranks are stopped by torchrun); rerunning
it with --resume continues from rank 0's last checkpoint, with any number of ranks.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, TypeVar

import torch
import torch.distributed as dist

from ticketc.errors import UserError

T = TypeVar("T")


@dataclass(frozen=True)
class Ranks:
    """This process's place among the ranks of one search (rank 0 of 1 without torchrun)."""

    rank: int = 0
    world: int = 1

    @property
    def main(self) -> bool:
        """Whether this rank reads and writes the run directory and prints."""
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        return self.world > 1

    def shard(self, batch: torch.Tensor) -> torch.Tensor:
        """This rank's part of a global batch [..., B] (last dimension): every world-th
        sample from the rank-th, as DistributedSampler deals them out."""
        return batch[..., self.rank :: self.world] if self.distributed else batch


SINGLE = Ranks()


def from_environment() -> Ranks:
    """The ranks torchrun started (joining the default process group: gloo, since find trains
    on CPU), or a single rank when not started by torchrun."""
    if not (dist.is_available() and dist.is_torchelastic_launched()):
        return SINGLE
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world == 1:
        return SINGLE
    if not dist.is_initialized():
        dist.init_process_group("gloo")
    return Ranks(dist.get_rank(), dist.get_world_size())


def leave(ranks: Ranks) -> None:
    """Leave the process group `from_environment` joined (after the search, on every rank)."""
    if ranks.distributed and dist.is_initialized():
        # Every rank arrives here (errors are broadcast); without the barrier a rank could tear
        # gloo down while rank 0 is still writing, which aborted rank 0 at exit under load.
        dist.barrier()
        dist.destroy_process_group()


def ends_without_shutdown() -> bool:
    """Whether this process, a rank of a multi-rank torchrun job, must end without Python's
    shutdown (`ticketc.cli.entry` calls os._exit once the command has returned).

    DistributedDataParallel keeps references to the gloo group (10 of them, torch 2.13: none
    visible to Python's gc), so destroy_process_group does not stop its worker threads. A
    worker that frees a finished collective's work after the interpreter began shutting down
    (the tensors of broadcast_object_list, held by the last barrier) needs the GIL, is made to
    exit by Python, and unwinding it aborts the process: SIGABRT, "terminate called without an
    active exception", after the search had finished (a gdb backtrace of the core: ~AsyncWork
    -> gil_scoped_acquire -> PyThread_exit_thread; 3 of 43 runs on 2 loaded cores)."""
    return (
        dist.is_available()
        and dist.is_torchelastic_launched()
        and int(os.environ.get("WORLD_SIZE", "1")) > 1
    )


def broadcast(obj: T, ranks: Ranks) -> T:
    """Rank 0's `obj` on every rank (pickled by torch.distributed between the ranks of this
    job only)."""
    if not ranks.distributed:
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=0)
    return box[0]  # type: ignore[return-value]


def on_main(fn: Callable[[], T], ranks: Ranks) -> T:
    """`fn()` run on rank 0 alone, its result (or its error) broadcast to every rank.

    A UserError on rank 0 is raised on every rank with the same message; any other error is
    re-raised on rank 0 and reported as a RuntimeError on the others.
    """
    if not ranks.distributed:
        return fn()
    outcome: tuple[str, Any] = ("ok", None)
    error: BaseException | None = None
    if ranks.main:
        try:
            outcome = ("ok", fn())
        except UserError as e:
            outcome, error = ("user", str(e)), e
        except BaseException as e:  # noqa: BLE001 - tell the other ranks, then re-raise
            outcome, error = ("crash", f"{type(e).__name__}: {e}"), e
    status, value = broadcast(outcome, ranks)
    if error is not None:
        raise error
    if status == "user":
        raise UserError(value)
    if status == "crash":
        raise RuntimeError(f"rank 0 failed: {value}")
    return value  # type: ignore[no-any-return]


def all_reduce_sum(t: torch.Tensor, ranks: Ranks) -> torch.Tensor:
    """The sum of `t` over the ranks (a new tensor; `t` is left as it was)."""
    out = t.clone()
    if ranks.distributed:
        dist.all_reduce(out, op=dist.ReduceOp.SUM)
    return out


def broadcast_tensors_(tensors: list[torch.Tensor], ranks: Ranks) -> None:
    """Overwrite `tensors` with rank 0's values, in place."""
    if ranks.distributed:
        for t in tensors:
            dist.broadcast(t, src=0)
