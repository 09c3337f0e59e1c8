"""RePaint's resampling schedule (Lugmayr et al., CVPR 2022) on a strided timestep grid.

A schedule is the sequence of grid positions a sampler visits: position 0 is the noisiest grid
time, position n the point the last step lands on. Going down one position is a denoising step
(one network call); going up is a jump back (re-noising with q(x_s | x_t), no network call).
"""

from __future__ import annotations


def jump_positions(n_steps: int, jump_length: int) -> range:
    """Where jumps may start: every ``jump_length``-th position counted back from the last
    network-call position n - 1, at least ``jump_length`` from the top. RePaint's jumps are at
    the times 0, L, 2L, ... (<= T - 1 - L) of its T calls, i.e. at these positions (p = T - 1 - t)."""
    if jump_length < 1:
        raise ValueError("need jump_length >= 1")
    return range(n_steps - 1, jump_length - 1, -jump_length)


def jump_schedule(n_steps: int, jump_length: int, jumps: int, may_jump=lambda position: True) -> list[int]:
    """Positions visited: down one position at a time; on reaching a jump position p (see
    ``jump_positions``; ``may_jump(p)``), the first ``jumps`` times go back up ``jump_length``
    positions and come down again. RePaint's jump_n_sample is jumps + 1.

    Denoising steps (network calls): n_steps + jumps * jump_length * (number of jump positions).
    With jumps = 0 it is plain descent 0, 1, ..., n_steps.
    """
    if jumps < 0:
        raise ValueError("need jumps >= 0")
    remaining = {p: jumps for p in jump_positions(n_steps, jump_length) if may_jump(p)}
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
    positions = sum(1 for p in jump_positions(n_steps, jump_length) if may_jump(p))
    return n_steps + jumps * jump_length * positions
