"""Which share of the samples this process runs, from the launcher that started it.

Data parallelism needs no coordination here: every sample belongs to the shard
`mmlens.data.shard_of(sample_id, count)`, each process runs its own shard and writes its own
parts, and readers merge them (docs/experiments.md, "Many GPUs and nodes"):

- `accelerate launch -m mmlens run ...` or `torchrun ... -m mmlens run ...` (``WORLD_SIZE`` > 1):
  the rank and the number of processes are the launcher's ``RANK`` and ``WORLD_SIZE``. On GPUs
  accelerate's `PartialState` joins the process group (NCCL) and gives this process' device;
  on CPUs (``--device cpu``, or no GPU) the process joins a gloo group itself, since
  `PartialState(cpu=True)` ignores the launcher's group and would make every process shard 0
  of 1;
- a SLURM job array (``SLURM_ARRAY_TASK_ID`` / ``SLURM_ARRAY_TASK_COUNT``): one independent job
  per shard;
- ``--shard INDEX/COUNT`` (``shard=(index, count)``): set by hand.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from datetime import timedelta
from typing import Any

import torch


@dataclass(frozen=True)
class Shard:
    """This process' shard: `index` of `count`; `device` chosen by the launcher (None: the
    caller's); `state` is accelerate's `PartialState` when a process group joins the shards."""

    index: int = 0
    count: int = 1
    device: torch.device | None = None
    state: Any = None

    def wait_for_everyone(self) -> None:
        """Block until every process of the group got here (no-op without a group)."""
        if self.state is not None:
            self.state.wait_for_everyone()


def current_shard(shard: tuple[int, int] | str | None = None, cpu: bool = False) -> Shard:
    """The shard of this process: `shard` if given (``(index, count)`` or ``"index/count"``),
    else from the launcher's environment (see the module doc), else the whole data set.

    Examples:
        >>> current_shard("1/4")
        Shard(index=1, count=4, device=None, state=None)
    """
    if shard is not None:
        index, count = _parse(shard)
        return Shard(index, count)
    if int(os.environ.get("WORLD_SIZE", "1")) > 1:
        rank, world = int(os.environ.get("RANK", "0")), int(os.environ["WORLD_SIZE"])
        if not cpu and torch.cuda.is_available():
            from accelerate import PartialState

            state = PartialState()
            return Shard(state.process_index, state.num_processes, state.device, state)
        return Shard(rank, world, torch.device("cpu"), _GlooGroup(rank, world))
    if "SLURM_ARRAY_TASK_COUNT" in os.environ:
        task = int(os.environ["SLURM_ARRAY_TASK_ID"]) - int(
            os.environ.get("SLURM_ARRAY_TASK_MIN", 0)
        )
        return Shard(task, int(os.environ["SLURM_ARRAY_TASK_COUNT"]))
    return Shard()


def _parse(shard: tuple[int, int] | str) -> tuple[int, int]:
    try:
        index, count = (int(part) for part in shard.split("/")) if isinstance(shard, str) else shard
    except (ValueError, TypeError):
        raise ValueError(f"shard {shard!r}: write INDEX/COUNT, e.g. 0/4") from None
    if not 0 <= index < count:
        raise ValueError(f"shard {shard!r}: need 0 <= INDEX < COUNT")
    return index, count


class _GlooGroup:
    """The launcher's process group on CPUs (gloo), for the end-of-run barrier; the barrier
    waits up to a day, since shards of a long run end at different times."""

    def __init__(self, rank: int, world: int):
        import torch.distributed as dist

        if not dist.is_initialized():
            dist.init_process_group("gloo", rank=rank, world_size=world, timeout=timedelta(days=1))

    def wait_for_everyone(self) -> None:
        """Block until every process of the group got here."""
        import torch.distributed as dist

        dist.barrier()
