"""Where a defense's randomness comes from: per-image noise streams.

A defense never touches the global RNG (AutoAttack reseeds it). It draws from ``NoiseStreams``:
either one stream per image, seeded from (run seed, image index, purpose) by the runner, or one
shared stream (a plain int seed, for direct use). With per-image streams an image's noise does not
depend on which other images share its batch, on the batch size, or on the rank of the process
that computes it, so sharded and single-process runs agree image by image.

A batch of k x n rows (k copies of the n images, as EOT and GDMP's paths make with
``x.repeat(k, 1, 1, 1)``) draws row j from image (j mod n)'s stream, copies in order. A batch of
any other size (AutoAttack's calls on the images it has not broken yet) cannot be matched to
images and draws from one stream shared by the batch; such calls are the same in a sharded run
because the runner shards whole batches.

Two views of a defense's streams serve attacks that purify some images only or must recompute
one purification exactly (DiffHammer; a defense draws from them inside
``Defense.drawing_noise_from``): ``subset(rows)``, some images' streams (drawing through it
advances the same generators), and ``CopyReplay``, which hands a batch of the images the noise
that chosen copies of them drew in an earlier batch of copies, from a ``snapshot()`` taken before.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from typing import Sequence, Union

import torch


@dataclass(frozen=True)
class Rows:
    """Draw as for a batch of ``total`` rows from ``generators``, keep the rows ``index``."""

    generators: "Generators"
    total: int
    index: torch.Tensor


Generators = Union[torch.Generator, Sequence[torch.Generator], Rows, None]
"""One generator for the whole tensor, one per row (diffusers' convention), the chosen rows of a
larger batch's draw (``Rows``), or the global RNG."""


def _draw(sample, x: torch.Tensor, generator: Generators) -> torch.Tensor:
    if isinstance(generator, Rows):  # the same draws as the larger batch made: bit-identical rows
        full = _draw(sample, x.new_empty((generator.total, *x.shape[1:])), generator.generators)
        return full[generator.index.to(full.device)]
    if generator is None or isinstance(generator, torch.Generator):
        return sample(x.shape, generator=generator, device=x.device, dtype=x.dtype)
    if len(generator) != x.shape[0]:
        raise ValueError(f"{len(generator)} generators for a batch of {x.shape[0]}")
    if not generator:
        return x.new_empty(x.shape)
    row = (1, *x.shape[1:])
    return torch.cat([sample(row, generator=g, device=x.device, dtype=x.dtype) for g in generator])


def randn_like(x: torch.Tensor, generator: Generators) -> torch.Tensor:
    """Standard normal noise shaped like ``x``; row j from ``generator[j]`` when a list."""
    return _draw(torch.randn, x, generator)


def rand_like(x: torch.Tensor, generator: Generators) -> torch.Tensor:
    """Uniform [0, 1) noise shaped like ``x``; row j from ``generator[j]`` when a list."""
    return _draw(torch.rand, x, generator)


def _seed_from(text: str) -> int:
    return int(hashlib.sha256(text.encode()).hexdigest()[:15], 16)


def stream_seed(seed: int, index: int, purpose: str) -> int:
    """The seed of image ``index``'s stream for one purpose ("attack", "evaluate") of a run."""
    return _seed_from(f"{seed}:{index}:{purpose}")


def image_seeds(seed: int, indices, purpose: str) -> list[int]:
    """The stream seeds of a batch's images (``indices``: their indices in the dataset)."""
    return [stream_seed(seed, int(i), purpose) for i in indices]


class NoiseStreams:
    """Random streams of one defense: ``seeds`` is an int (one shared stream) or one int per image."""

    def __init__(self, seeds: int | Sequence[int]):
        self.per_image = not isinstance(seeds, int)
        self.seeds = [int(s) for s in seeds] if self.per_image else [int(seeds)]
        # The shared stream of a per-image batch (for calls that do not match its images).
        self.shared_seed = _seed_from(f"shared:{self.seeds}") if self.per_image else self.seeds[0]
        self._generators: dict[tuple[torch.device, int], torch.Generator] = {}

    def _generator(self, device: torch.device, seed: int) -> torch.Generator:
        key = (device, seed)
        if key not in self._generators:  # created once, then advanced by every draw
            self._generators[key] = torch.Generator(device).manual_seed(seed)
        return self._generators[key]

    def for_batch(self, x: torch.Tensor) -> Generators:
        """The generator(s) for a batch ``x``: per row when it is k copies of the images."""
        return self.for_rows(x.shape[0], x.device)

    def for_rows(self, rows: int, device: torch.device) -> Generators:
        """The generator(s) for a batch of ``rows`` rows on ``device`` (see ``for_batch``)."""
        n = len(self.seeds)
        if self.per_image and rows % n == 0 and rows > 0:
            per_image = [self._generator(device, s) for s in self.seeds]
            return per_image * (rows // n)
        return self._generator(device, self.shared_seed)

    def subset(self, rows: Sequence[int]) -> "NoiseStreams":
        """The streams of the images ``rows`` (positions in ``seeds``), sharing this object's
        generators, so an image's noise goes on as if it had stayed in the full batch (a batch
        of other size still draws from the shared stream)."""
        if not self.per_image:
            return self
        part = NoiseStreams([self.seeds[i] for i in rows])
        part.shared_seed, part._generators = self.shared_seed, self._generators
        return part

    def snapshot(self) -> "NoiseStreams":
        """An independent copy at the streams' current positions: it draws what this object
        would draw next, and drawing from either leaves the other where it was."""
        copy = NoiseStreams(self.seeds if self.per_image else self.seeds[0])
        copy.shared_seed = self.shared_seed
        for (device, seed), generator in self._generators.items():
            clone = torch.Generator(device)
            clone.set_state(generator.get_state())
            copy._generators[(device, seed)] = clone
        return copy


class CopyReplay:
    """Noise for a batch of n images that replays, image by image, one copy of an earlier batch
    of ``copies`` copies of them (``x.repeat(copies, 1, 1, 1)``) drawn from ``snapshot`` (taken
    just before that batch): image b gets exactly the noise its copy ``copy[b]`` drew, because
    every draw repeats the earlier batch's draw (from fresh copies of the snapshot's generators)
    and keeps those rows. A draw for k x n rows (a defense that repeats its input, as GDMP's
    paths do) mirrors the earlier k x copies x n rows. Use one replay for one purification."""

    def __init__(self, snapshot: NoiseStreams, copies: int, copy: torch.Tensor):
        self.streams, self.copies, self.copy = snapshot.snapshot(), copies, copy.long().cpu()

    def for_batch(self, x: torch.Tensor) -> Rows:
        rows, n = x.shape[0], len(self.copy)
        if rows % n:
            raise ValueError(f"a replayed batch must be copies of the {n} images, got {rows} rows")
        # row p * n + b of this batch was row p * copies * n + copy[b] * n + b of the earlier one
        block, image = torch.arange(rows) // n, torch.arange(rows) % n
        index = block * self.copies * n + self.copy[image] * n + image
        return Rows(self.streams.for_rows(rows * self.copies, x.device), rows * self.copies, index)
