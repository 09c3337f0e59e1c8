"""Runs sharded over processes with torch.distributed, as started by ``torchrun``.

torchrun sets RANK, WORLD_SIZE and LOCAL_RANK; gloo is used on CPU and NCCL on GPUs. Work is
sharded by whole batches (a batch's results do not depend on which rank computes it, see
noise.py), each rank commits its batches to its own store file (nodes need not share a disk), and
rank 0 gathers every shard's batches into the main store and writes the leaderboard.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from datetime import timedelta
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist


@dataclass(frozen=True)
class Ranks:
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0

    @property
    def distributed(self) -> bool:
        return self.world_size > 1

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    def shard_path(self, store: Path) -> Path:
        """This rank's own store file next to the main one."""
        return store.with_name(f"{store.stem}.rank{self.rank}{store.suffix}")


def ranks_from_env() -> Ranks:
    """The process's place in a torchrun launch (a single process when not launched by torchrun)."""
    env = os.environ
    return Ranks(int(env.get("RANK", 0)), int(env.get("WORLD_SIZE", 1)), int(env.get("LOCAL_RANK", 0)))


def device_for(ranks: Ranks, requested: str) -> torch.device:
    """'auto' is this rank's GPU when there is one, else the CPU."""
    if requested == "auto":
        requested = "cuda" if torch.cuda.is_available() else "cpu"
    if requested == "cuda":
        return torch.device("cuda", ranks.local_rank)
    return torch.device(requested)


def init(ranks: Ranks, device: torch.device) -> None:
    if ranks.distributed and not dist.is_initialized():
        backend = "nccl" if device.type == "cuda" else "gloo"
        if device.type == "cuda":
            torch.cuda.set_device(device)
        # Paper-scale shards take hours: rank 0 waits for the slowest at the final gather.
        dist.init_process_group(backend, timeout=timedelta(days=7))


def finish(ranks: Ranks) -> None:
    if ranks.distributed and dist.is_initialized():
        dist.destroy_process_group()


def barrier(ranks: Ranks) -> None:
    if ranks.distributed:
        dist.barrier()


def all_gather(ranks: Ranks, value: Any) -> list[Any]:
    """Every rank's ``value``, in rank order (just ``[value]`` in a single process)."""
    if not ranks.distributed:
        return [value]
    out: list[Any] = [None] * ranks.world_size
    dist.all_gather_object(out, value)
    return out


def gather_to_main(ranks: Ranks, value: Any) -> list[Any] | None:
    """Every rank's ``value`` on rank 0 (None elsewhere)."""
    if not ranks.distributed:
        return [value]
    out: list[Any] | None = [None] * ranks.world_size if ranks.is_main else None
    dist.gather_object(value, out, dst=0)
    return out
