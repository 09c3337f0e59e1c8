"""CPU threads per process: how many intra-op threads, and how long idle OpenMP threads spin.

By default torch starts one OpenMP thread per core in every process. Processes that share the
cores (torchrun ranks, two runs side by side, a run next to a training job) then oversubscribe
them, and OpenMP's idle threads spin for a while before they sleep, taking the cores from the
threads that have work: on 2 cores two runs side by side took 6.5x as long as one alone (M15).

``intra_op_threads`` is the policy (pure); ``configure`` applies it, and must run before
torch is first imported for its spin setting to reach the OpenMP runtime (the CLI calls it
first thing; ``python -m hetpure_bench`` imports torch only after).
"""

from __future__ import annotations

import os
from collections.abc import Mapping

from .errors import UserError

# libgomp (torch's OpenMP on Linux) spins 300,000 times before an idle thread sleeps. 3,000 is
# as fast as that for a run alone and much less wasteful beside another process (README
# "Threads" has the measurements).
GOMP_SPINCOUNT = "3000"
# The user's own spin settings, which then stay untouched.
SPIN_SETTINGS = ("OMP_WAIT_POLICY", "GOMP_SPINCOUNT")


def affinity_cores() -> int:
    """The cores this process may run on (its CPU affinity, e.g. under taskset or a container's
    cpuset), not the machine's count."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # no sched_getaffinity (macOS)
        return os.cpu_count() or 1


def local_world_size(env: Mapping[str, str]) -> int:
    """Processes of this launch on this machine (torchrun's LOCAL_WORLD_SIZE; 1 otherwise)."""
    return max(1, int(env.get("LOCAL_WORLD_SIZE") or 1))


def _env_threads(name: str, value: str) -> int:
    first = value.split(",")[0].strip()  # OpenMP's nested list "4,2": the outermost level, as torch reads it
    if not first.isdigit() or int(first) < 1:
        raise UserError(f"{name} must be a whole number >= 1, got {value!r}")
    return int(first)


def _torchrun_default(name: str, value: str, env: Mapping[str, str]) -> bool:
    """torchrun sets OMP_NUM_THREADS=1 in every worker when it starts several per machine and the
    user set none; the user's own 1 cannot be told from it, so under torchrun --threads 1 pins it."""
    return name == "OMP_NUM_THREADS" and value.strip() == "1" and "TORCHELASTIC_RUN_ID" in env \
        and local_world_size(env) > 1


def intra_op_threads(affinity_cores: int, local_world_size: int, requested: int | None,
                     env: Mapping[str, str]) -> tuple[int, str]:
    """This process's intra-op threads and why: ``requested`` (--threads) wins, then the user's
    MKL_NUM_THREADS or OMP_NUM_THREADS (torch's own order: MKL's wins), else the cores of the
    process's affinity shared by the local processes of a launch (at least 1 each)."""
    if requested is not None:
        if requested < 1:
            raise UserError(f"--threads must be >= 1, got {requested}")
        return requested, "--threads"
    for name in ("MKL_NUM_THREADS", "OMP_NUM_THREADS"):
        value = env.get(name, "")
        if value.strip() and not _torchrun_default(name, value, env):
            return _env_threads(name, value), name
    return max(1, affinity_cores // local_world_size), f"{affinity_cores} cores / {local_world_size} local processes"


def configure(requested: int | None) -> tuple[int, str]:
    """Apply the policy to this process: the spin count (unless the user set one; effective only
    if torch is not imported yet) and torch's intra-op threads. Returns ``intra_op_threads``'s answer."""
    threads, reason = intra_op_threads(affinity_cores(), local_world_size(os.environ), requested, os.environ)
    if not any(os.environ.get(name) for name in SPIN_SETTINGS):
        os.environ["GOMP_SPINCOUNT"] = GOMP_SPINCOUNT
    import torch  # after the spin setting: libgomp reads it when torch loads it

    torch.set_num_threads(threads)
    return threads, reason
