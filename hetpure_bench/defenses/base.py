"""The one interface every defense implements.

A defense is an ``nn.Module`` around a classifier and (usually) a diffusion model:
- ``purify(x01)`` maps [0,1] images to [0,1] images;
- ``defense(x01)`` returns the classifier's logits on the purified images;
- ``nfe`` is the number of diffusion-network calls per defended prediction, i.e. per call of
  ``defense(x)`` (closed form; equal to the calls of one purification unless the defense combines
  several, as GDMP's paths do);
- all randomness comes from the defense's own noise streams (``generator(x)``, see noise.py:
  one stream per image when the runner seeds it per image), never from the global RNG, because
  attacks such as AutoAttack reseed it;
- ``surrogate(k)`` returns a cheaper version with about k network calls, for "surrogate:k"
  gradients (the attack then differentiates that, and the result is labelled as such);
- ``drawing_noise_from(streams)``: within the block, noise comes from other streams (noise.py:
  a subset of the images' streams, or a replay of one copy of an earlier batch), so that an
  attack can purify some images only, or recompute one purification exactly (DiffHammer).
  A defense that draws all its noise through ``generator(x)`` gets this for free.
"""

from __future__ import annotations

import dataclasses
from contextlib import contextmanager
from typing import Any, ClassVar, Iterator, Sequence

import torch
from torch import nn

from ..diffusion.schedule import VPSchedule
from ..errors import UserError
from ..noise import Generators, NoiseStreams


class Defense(nn.Module):
    name: ClassVar[str]
    config_class: ClassVar[type]
    needs_diffusion: ClassVar[bool] = True
    threat_defaults: ClassVar[dict[str, dict[str, Any]]] = {}  # config changes per threat model

    def __init__(
        self, classifier: nn.Module, diffusion: nn.Module | None, config: Any = None, seed: int | Sequence[int] = 0
    ):
        super().__init__()
        if self.needs_diffusion and diffusion is None:
            raise UserError(f"defense {self.name!r} needs a diffusion model")
        self.classifier = classifier
        self.diffusion = diffusion
        self.config = config if config is not None else self.config_class()
        self.schedule = VPSchedule()
        self.reseed(seed)

    def generator(self, x: torch.Tensor) -> Generators:
        """The generator(s) to draw noise for batch ``x`` from (pass them to noise.randn_like)."""
        return self.noise.for_batch(x)

    def reseed(self, seed: int | Sequence[int]) -> None:
        """Restart the noise: one shared stream (an int) or one stream per image (a list)."""
        self.seed = seed
        self.noise = NoiseStreams(seed)

    @contextmanager
    def drawing_noise_from(self, streams: Any) -> Iterator[None]:
        """Within the block, draw noise from ``streams`` (anything with ``for_batch(x)``, such as
        ``NoiseStreams.subset`` or ``CopyReplay``), then from the defense's own streams again."""
        own = self.noise
        self.noise = streams
        try:
            yield
        finally:
            self.noise = own

    def purify(self, x01: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    @property
    def nfe(self) -> int:
        raise NotImplementedError

    def surrogate(self, network_calls: int) -> "Defense":
        raise UserError(f"defense {self.name!r} has no surrogate version")

    def replace(self, **changes: Any) -> "Defense":
        """The same defense (same networks and seed) with some configuration fields changed."""
        return type(self)(self.classifier, self.diffusion, dataclasses.replace(self.config, **changes), self.seed)

    def forward(self, x01: torch.Tensor) -> torch.Tensor:
        return self.classifier(self.purify(x01))

    def stages(self, x01: torch.Tensor) -> list[tuple[str, torch.Tensor]]:
        """Named intermediate images for figures, the purified one first (so that it uses the
        same noise as ``purify`` right after a reseed): [0,1] images, or (B, 1, H, W) masks
        named "mask". Defenses add what they have (a mask, the noised image)."""
        return [("purified", self.purify(x01))]

    def describe(self) -> str:
        """The full configuration as ``key=value`` pairs (nested ones dotted), for result labels."""
        return " ".join(f"{k}={v}" for k, v in _flatten(dataclasses.asdict(self.config)).items())


def _flatten(settings: dict, prefix: str = "") -> dict:
    flat = {}
    for key, value in settings.items():
        if isinstance(value, dict):
            flat.update(_flatten(value, f"{prefix}{key}."))
        elif isinstance(value, (tuple, list)):
            flat[prefix + key] = ",".join(map(str, value)) or "default"
        else:
            flat[prefix + key] = value
    return flat


@dataclasses.dataclass(frozen=True)
class NoConfig:
    pass


class NoDefense(Defense):
    """The bare classifier: purification is the identity."""

    name = "none"
    config_class = NoConfig
    needs_diffusion = False

    def purify(self, x01: torch.Tensor) -> torch.Tensor:
        return x01

    @property
    def nfe(self) -> int:
        return 0

    def surrogate(self, network_calls: int) -> "Defense":
        return self
