"""RePaint's resampling schedule (Lugmayr et al., CVPR 2022) on a strided timestep grid.

A schedule is the sequence of grid positions a sampler visits: position 0 is the noisiest grid
time, position n the clean image. Going down one position is a denoising step (one network
call); going up is a jump back (re-noising with q(x_s | x_t), no network call).
"""

from __future__ import annotations


def jump_schedule(n_steps: int, jump_length: int, jumps: int, may_jump=lambda position: True) -> list[int]:
    """Positions visited: down one position at a time; on reaching a position p that is a
    multiple of ``jump_length`` (0 < p < n_steps, ``may_jump(p)``), the first ``jumps`` times go
    back up ``jump_length`` positions and come down again.

    Denoising steps (network calls): n_steps + jumps * jump_length * (number of jump positions).
    With jumps = 0 it is plain descent 0, 1, ..., n_steps.
    """
    if jump_length < 1 or jumps < 0:
        raise ValueError("need jump_length >= 1 and jumps >= 0")
    remaining = {
        p: jumps for p in range(jump_length, n_steps, jump_length) if may_jump(p)
    }
    position, visited = 0, [0]
    while position < n_steps:
        position += 1
        visited.append(position)
        if remaining.get(position, 0) > 0:
            remaining[position] -= 1
            for _ in range(jump_length):
                position -= 1
                visited.append(position)
    return visited


def denoising_steps(n_steps: int, jump_length: int, jumps: int, may_jump=lambda position: True) -> int:
    """The closed-form number of denoising steps of ``jump_schedule``."""
    positions = sum(1 for p in range(jump_length, n_steps, jump_length) if may_jump(p))
    return n_steps + jumps * jump_length * positions
