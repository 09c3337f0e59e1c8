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
- ``deviation_states(x01)`` (optional; DiffAttack's hook): the purified images together with the
  reverse-process states of the same pass and the forward noise (``DeviationStates``); a defense
  without such states keeps the default, a one-line refusal.
- ``attention_mask(x01)`` (optional; the mask-aware and mask-avoiding attacks' hook): the
  detached {0,1} attention mask (B, 1, H, W) the defense computes on its input, 1 where the
  noise is strong; ``has_attention_mask`` says whether there is one, ``with_mask_gradient(T)``
  gives the defense with a differentiable (straight-through) mask. A defense without one keeps
  the defaults: False, and one-line refusals.
- ``drawing_noise_from(streams)``: within the block, noise comes from other streams (noise.py:
  a subset of the images' streams, or a replay of one copy of an earlier batch), so that an
  attack can purify some images only, or recompute one purification exactly (DiffHammer).
  A defense that draws all its noise through ``generator(x)`` gets this for free.
"""

from __future__ import annotations

import dataclasses
from contextlib import contextmanager
from typing import Any, Callable, ClassVar, Iterator, Sequence

import torch
from torch import nn

from ..diffusion.noise import Generators, NoiseStreams
from ..diffusion.schedule import VPSchedule, diffuse
from ..errors import UserError


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

    def deviation_states(self, x01: torch.Tensor) -> "DeviationStates":
        """The purified [0,1] images of ``x01`` and, from the same purification pass (no second
        one), the reverse-process states and the forward noise DiffAttack's deviated-reconstruction
        loss compares (see ``DeviationStates``). Only for defenses whose prediction is
        ``classifier(purify(x01))``; the default refuses in one line."""
        raise UserError(f"defense {self.name!r} exposes no reverse-process states: diffattack needs them")

    @property
    def has_attention_mask(self) -> bool:
        """Whether ``attention_mask`` and ``with_mask_gradient`` answer (a configured classifier-attention mask)."""
        return False

    def attention_mask(self, x01: torch.Tensor) -> torch.Tensor:
        """The detached {0,1} attention mask (B, 1, H, W) of the [0,1] images ``x01`` that the
        defense's purification uses (1: strong noise); the default refuses in one line."""
        raise UserError(f"defense {self.name!r} has no attention mask")

    def with_mask_gradient(self, temperature: float) -> "Defense":
        """The same defense with a straight-through differentiable attention mask (sigmoid
        temperature ``temperature``); the default refuses in one line."""
        raise UserError(f"defense {self.name!r} has no attention mask to attack")

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


def exposes_deviation_states(defense: Defense | type[Defense]) -> bool:
    """Whether a defense (or defense class) implements ``deviation_states``."""
    cls = defense if isinstance(defense, type) else type(defense)
    return cls.deviation_states is not Defense.deviation_states


@dataclasses.dataclass(frozen=True)
class DeviationStates:
    """One purification pass as DiffAttack's deviated-reconstruction loss sees it.

    ``purified``: the [0,1] images, bit for bit what ``purify`` returns under the same noise.
    ``reverse``: the sampler loop's states x'_t in [-1,1] at every point it visits, in order: the
    start first (the forward-diffused input itself), the last state (at t = 0 or the clean
    image) last; ``times`` their t and ``alpha_bars`` (float64, one per state) their noise
    levels. ``diffused(i)`` is the forward-diffused input at state i's level,
    x_t = sqrt(abar_t) x0 + sqrt(1 - abar_t) eps, with ``x0`` the input in [-1,1] and ``noise``
    eps, the very noise of the forward noising to the start (so that at the start x_t = x'_t).
    Everything stays on the autograd graph; the attack detaches the targets x_t.
    """

    purified: torch.Tensor
    x0: torch.Tensor
    noise: torch.Tensor
    times: tuple[float, ...]
    alpha_bars: torch.Tensor
    reverse: tuple[torch.Tensor, ...]

    def diffused(self, i: int) -> torch.Tensor:
        return diffuse(self.x0, self.alpha_bars[i], self.noise)


class StateLog:
    """Collects a sampler loop's states (``sample_loop``'s ``on_state``) into ``DeviationStates``."""

    def __init__(self):
        self.times: list[float] = []
        self.states: list[torch.Tensor] = []

    def __call__(self, t: float, x: torch.Tensor) -> None:
        self.times.append(t)
        self.states.append(x)

    def deviation_states(
        self, purified: torch.Tensor, x01: torch.Tensor, noise: torch.Tensor, alpha_bar: Callable[[float], Any],
    ) -> DeviationStates:
        """The collected states with their noise levels ``alpha_bar(t)`` (a float or a 0-dim tensor)."""
        levels = torch.tensor([float(alpha_bar(t)) for t in self.times], dtype=torch.float64)
        return DeviationStates(purified, x01 * 2 - 1, noise, tuple(self.times), levels, tuple(self.states))


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
