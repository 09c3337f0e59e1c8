"""DDPM++ (score_sde's NCSN++ network in its DDPM++ configuration) and its checkpoint loaders.

This is the network of score_sde's ``configs/vp/cifar10_ddpmpp_deep_continuous.py`` whose
``checkpoint_8.pth`` is the CIFAR-10 diffusion model DiffPure purifies with: a U-Net with
BigGAN-style residual blocks (the down/up-sampling happens inside a residual block: 2x2 average
pooling or nearest-neighbour repetition, no FIR kernels), residual sums divided by sqrt(2),
self-attention at 16x16 and in the middle, swish activations and GroupNorm with
min(C // 4, 32) groups (eps 1e-6). The default ``DDPMppConfig`` is that checkpoint's config
(106,632,579 parameters: 328,704 in the time-embedding MLP, 3,584 in the input conv, 39,372,800
in the down path, 2,888,704 in the middle, 64,035,072 in the up path and 3,715 in the output
layers); other settings only serve to build tiny copies for tests.

Values: ``model(x, t)`` takes x in [-1, 1] of shape (B, C, H, W) and timestep labels t of shape
(B,) (ints or floats; DDPM's sinusoidal embedding of the raw value) and returns eps, the noise
in x = sqrt(alpha_bar) x_0 + sqrt(1 - alpha_bar) eps. In score_sde's continuous VP model the
labels are 999 * t for t in [0, 1] and score = -output / std, so the raw output is eps and
integer labels 0..999 are the DDPM timesteps. The vp/cifar10_ddpmpp_deep_continuous config sets
``data.centered = True`` (the default config's False is overridden), so the network takes
[-1, 1] as it is; ``centered=False`` makes it map x in [0, 1] to 2x - 1 itself, as score_sde does.

Checkpoint format: score_sde keeps every layer in one flat ``nn.ModuleList`` called
``all_modules`` and trains it wrapped in ``nn.DataParallel``; ``checkpoint_N.pth`` holds
``{"model": state_dict with keys "module.all_modules.<i>.<layer>.<param>" and the buffer
"module.sigmas", "ema": {"decay", "num_updates", "shadow_params": [one tensor per parameter, in
model.parameters() order]}, "optimizer": Adam's state dict, "step": ...}``. ``DDPMpp`` registers
the same layers in the same order under the same names (``Conv_0``, ``GroupNorm_0``,
``Dense_0``, ``NIN_0``, ...), so both the named state dict and the positional EMA list load.
``sigmas`` (float64, one per noise scale) is NCSN++'s table of VE noise levels; it only
matters when the output is scaled by sigma (VE models), never in this VP model, so ``DDPMpp``
has no buffers and the loader drops that one key (any other unexpected key is an error). The
EMA weights are the ones used for sampling and purification; ``convert_to_safetensors`` caches
them so the pickle is read only once.
"""

from __future__ import annotations

import json
import math
import pickle
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from safetensors import SafetensorError
from safetensors.torch import load_file, safe_open, save_file
from torch import nn

from ..atomic import atomic_path
from ..errors import UserError


@dataclass(frozen=True)
class DDPMppConfig:
    """The network's shape; the defaults are score_sde's vp/cifar10_ddpmpp_deep_continuous."""

    image_size: int = 32
    num_channels: int = 3
    nf: int = 128
    ch_mult: tuple[int, ...] = (1, 2, 2, 2)
    num_res_blocks: int = 8
    attn_resolutions: tuple[int, ...] = (16,)
    dropout: float = 0.1
    centered: bool = True


def _group_norm(channels: int) -> nn.GroupNorm:
    return nn.GroupNorm(num_groups=min(channels // 4, 32), num_channels=channels, eps=1e-6)


def _conv3x3(in_ch: int, out_ch: int) -> nn.Conv2d:
    return nn.Conv2d(in_ch, out_ch, kernel_size=3, padding=1)


def timestep_embedding(t: torch.Tensor, dim: int, max_positions: int = 10000) -> torch.Tensor:
    """DDPM's sinusoidal embedding (sin half, then cos half) of real-valued labels t of shape (B,)."""
    half = dim // 2
    step = -math.log(max_positions) / (half - 1)  # a float64 scalar, as in the reference
    freqs = torch.exp(torch.arange(half, dtype=torch.float32, device=t.device) * step)
    angles = t.float()[:, None] * freqs[None, :]
    return torch.cat([torch.sin(angles), torch.cos(angles)], dim=1)


class NIN(nn.Module):
    """A per-pixel linear map; score_sde stores it as W (in, out) and b, not as a 1x1 conv."""

    def __init__(self, in_dim: int, out_dim: int):
        super().__init__()
        # Weights come from a checkpoint; this init only keeps a fresh model's activations sane
        # (score_sde's DDPM variance-scaling init, with zeroed output layers, is not reproduced).
        bound = 1 / math.sqrt(in_dim)
        self.W = nn.Parameter(torch.empty(in_dim, out_dim).uniform_(-bound, bound))
        self.b = nn.Parameter(torch.zeros(out_dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.einsum("bchw,co->bohw", x, self.W) + self.b[:, None, None]


class AttnBlock(nn.Module):
    """Single-head self-attention over all pixels, with a rescaled residual."""

    def __init__(self, channels: int):
        super().__init__()
        self.GroupNorm_0 = _group_norm(channels)
        self.NIN_0 = NIN(channels, channels)  # query
        self.NIN_1 = NIN(channels, channels)  # key
        self.NIN_2 = NIN(channels, channels)  # value
        self.NIN_3 = NIN(channels, channels)  # output projection

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, c, h, w = x.shape
        normed = self.GroupNorm_0(x)
        # (B, 1 head, H*W tokens, C): SDPA's default 1/sqrt(C) scale is the reference's.
        q, k, v = (
            nin(normed).reshape(b, 1, c, h * w).transpose(2, 3)
            for nin in (self.NIN_0, self.NIN_1, self.NIN_2)
        )
        out = F.scaled_dot_product_attention(q, k, v).transpose(2, 3).reshape(b, c, h, w)
        return (x + self.NIN_3(out)) / math.sqrt(2.0)


class ResnetBlockBigGAN(nn.Module):
    """BigGAN-style residual block; ``up``/``down`` resample both branches inside the block."""

    def __init__(
        self, in_ch: int, out_ch: int, temb_dim: int, dropout: float, up: bool = False, down: bool = False
    ):
        super().__init__()
        self.up, self.down = up, down
        # Attribute order is registration order, which fixes the EMA list's order: keep it.
        self.GroupNorm_0 = _group_norm(in_ch)
        self.Conv_0 = _conv3x3(in_ch, out_ch)
        self.Dense_0 = nn.Linear(temb_dim, out_ch)
        self.GroupNorm_1 = _group_norm(out_ch)
        self.Dropout_0 = nn.Dropout(dropout)
        self.Conv_1 = _conv3x3(out_ch, out_ch)
        self.Conv_2 = nn.Conv2d(in_ch, out_ch, kernel_size=1) if in_ch != out_ch or up or down else None

    def _resample(self, x: torch.Tensor) -> torch.Tensor:
        if self.up:
            return F.interpolate(x, scale_factor=2, mode="nearest")
        if self.down:
            return F.avg_pool2d(x, kernel_size=2)
        return x

    def forward(self, x: torch.Tensor, temb: torch.Tensor) -> torch.Tensor:
        h = self._resample(F.silu(self.GroupNorm_0(x)))
        x = self._resample(x)
        h = self.Conv_0(h) + self.Dense_0(F.silu(temb))[:, :, None, None]
        h = self.Conv_1(self.Dropout_0(F.silu(self.GroupNorm_1(h))))
        if self.Conv_2 is not None:
            x = self.Conv_2(x)
        return (x + h) / math.sqrt(2.0)


class DDPMpp(nn.Module):
    """score_sde's NCSN++ in the DDPM++ configuration: ``model(x in [-1, 1], t labels) -> eps``."""

    def __init__(self, config: DDPMppConfig = DDPMppConfig()):
        super().__init__()
        self.config = config
        nf, temb_dim = config.nf, 4 * config.nf
        resolutions = [config.image_size // 2**level for level in range(len(config.ch_mult))]
        self._attn_at_level = [r in config.attn_resolutions for r in resolutions]

        def block(in_ch: int, out_ch: int | None = None, **resample: bool) -> ResnetBlockBigGAN:
            return ResnetBlockBigGAN(in_ch, out_ch or in_ch, temb_dim, config.dropout, **resample)

        # One flat list in score_sde's order: its index is part of every checkpoint key.
        layers: list[nn.Module] = [nn.Linear(nf, temb_dim), nn.Linear(temb_dim, temb_dim)]
        layers.append(_conv3x3(config.num_channels, nf))
        skip_channels, ch = [nf], nf
        for level, mult in enumerate(config.ch_mult):
            for _ in range(config.num_res_blocks):
                layers.append(block(ch, nf * mult))
                ch = nf * mult
                if self._attn_at_level[level]:
                    layers.append(AttnBlock(ch))
                skip_channels.append(ch)
            if level != len(config.ch_mult) - 1:
                layers.append(block(ch, down=True))
                skip_channels.append(ch)
        layers += [block(ch), AttnBlock(ch), block(ch)]
        for level, mult in reversed(list(enumerate(config.ch_mult))):
            for _ in range(config.num_res_blocks + 1):
                layers.append(block(ch + skip_channels.pop(), nf * mult))
                ch = nf * mult
            if self._attn_at_level[level]:
                layers.append(AttnBlock(ch))
            if level != 0:
                layers.append(block(ch, up=True))
        layers += [_group_norm(ch), _conv3x3(ch, config.num_channels)]
        self.all_modules = nn.ModuleList(layers)

    def forward(self, x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        # The flat list is consumed in construction order, exactly as score_sde does.
        layers = iter(self.all_modules)
        temb = next(layers)(timestep_embedding(t, self.config.nf))
        temb = next(layers)(F.silu(temb))
        if not self.config.centered:
            x = 2 * x - 1
        hs = [next(layers)(x)]
        last = len(self.config.ch_mult) - 1
        for level in range(last + 1):
            for _ in range(self.config.num_res_blocks):
                h = next(layers)(hs[-1], temb)
                if self._attn_at_level[level]:
                    h = next(layers)(h)
                hs.append(h)
            if level != last:
                hs.append(next(layers)(hs[-1], temb))
        h = next(layers)(hs[-1], temb)
        h = next(layers)(h)
        h = next(layers)(h, temb)
        for level in reversed(range(last + 1)):
            for _ in range(self.config.num_res_blocks + 1):
                h = next(layers)(torch.cat([h, hs.pop()], dim=1), temb)
            if self._attn_at_level[level]:
                h = next(layers)(h)
            if level != 0:
                h = next(layers)(h, temb)
        h = F.silu(next(layers)(h))
        return next(layers)(h)


def count_parameters(config: DDPMppConfig = DDPMppConfig()) -> int:
    """The number of parameters, counted on the meta device (no memory, no init)."""
    with torch.device("meta"):
        model = DDPMpp(config)
    return sum(p.numel() for p in model.parameters())


def _frozen(model: DDPMpp, state: dict[str, torch.Tensor]) -> DDPMpp:
    # assign=True adopts the loaded tensors, so a meta-built model never allocates random weights.
    model.load_state_dict(state, strict=True, assign=True)
    model.requires_grad_(False)
    return model.eval()


def _check_shapes(path: Path, what: str, expected: dict[str, torch.Size], found: dict) -> None:
    """Raise a one-line UserError if ``found`` lacks, adds or reshapes any of ``expected``."""
    missing = sorted(expected.keys() - found.keys())
    extra = sorted(found.keys() - expected.keys())
    if missing or extra:
        raise UserError(
            f"score_sde checkpoint {path}: {what} does not fit the DDPM++ config "
            f"(missing {missing[:3]}, unexpected {extra[:3]})"
        )
    for name, shape in expected.items():
        value = found[name]
        if not isinstance(value, torch.Tensor) or value.shape != shape:
            got = tuple(value.shape) if isinstance(value, torch.Tensor) else type(value).__name__
            raise UserError(f"score_sde checkpoint {path}: {what} {name} is {got}, expected {tuple(shape)}")


UNUSED_BUFFER = "sigmas"
"""The one entry of score_sde's model state dict that is not a DDPM++ weight (see above)."""


def load_score_sde_checkpoint(path: Path, config: DDPMppConfig = DDPMppConfig()) -> DDPMpp:
    """Load a score_sde ``checkpoint_N.pth`` with its EMA weights, frozen and in eval mode."""
    path = Path(path)
    if not path.is_file():
        raise UserError(f"score_sde checkpoint {path} does not exist")
    try:
        checkpoint = torch.load(path, map_location="cpu", weights_only=True)
    except (RuntimeError, pickle.UnpicklingError, EOFError, OSError, ValueError) as exc:
        raise UserError(
            f"score_sde checkpoint {path} is not a readable PyTorch file "
            f"(truncated download or an HTML page?): {type(exc).__name__}"
        ) from None
    try:
        named, shadow = dict(checkpoint["model"]), checkpoint["ema"]["shadow_params"]
    except (KeyError, TypeError, ValueError, IndexError):
        raise UserError(f"score_sde checkpoint {path} lacks 'model' or 'ema' -> 'shadow_params'") from None
    with torch.device("meta"):
        model = DDPMpp(config)
    expected = {name: p.shape for name, p in model.state_dict().items()}
    # The named weights are only checked: they prove the layout, so the positional EMA list
    # (which carries no names) lines up with model.parameters().
    named = {k.removeprefix("module."): v for k, v in named.items()}
    named.pop(UNUSED_BUFFER, None)
    _check_shapes(path, "model weight", expected, named)
    names = [name for name, _ in model.named_parameters()]
    if not isinstance(shadow, (list, tuple)) or len(shadow) != len(names):
        count = len(shadow) if isinstance(shadow, (list, tuple)) else type(shadow).__name__
        raise UserError(f"score_sde checkpoint {path}: EMA has {count} tensors, expected {len(names)}")
    ema = dict(zip(names, shadow))
    _check_shapes(path, "EMA tensor for", {n: expected[n] for n in names}, ema)
    return _frozen(model, {name: tensor.float() for name, tensor in ema.items()})


def convert_to_safetensors(model: DDPMpp, dest: Path) -> None:
    """Write ``model``'s weights and config to ``dest`` atomically (a cache of the converted .pth)."""
    tensors = {name: tensor.detach().float().contiguous() for name, tensor in model.state_dict().items()}
    with atomic_path(Path(dest)) as tmp:
        save_file(tensors, str(tmp), metadata={"ddpmpp_config": json.dumps(asdict(model.config))})


def load_ddpmpp_safetensors(path: Path) -> DDPMpp:
    """Load a file written by ``convert_to_safetensors``, frozen and in eval mode."""
    path = Path(path)
    if not path.is_file():
        raise UserError(f"DDPM++ weights {path} do not exist")
    try:
        with safe_open(str(path), framework="pt") as handle:
            fields = json.loads((handle.metadata() or {})["ddpmpp_config"])
        # JSON turns the config's tuples into lists; the frozen config wants them back.
        config = DDPMppConfig(**{k: tuple(v) if isinstance(v, list) else v for k, v in fields.items()})
        with torch.device("meta"):
            model = DDPMpp(config)
        return _frozen(model, load_file(str(path)))
    except (SafetensorError, OSError, KeyError, ValueError, RuntimeError, TypeError) as exc:
        first_line = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
        raise UserError(f"DDPM++ weights {path} are corrupt or not a DDPM++ file: {first_line}") from None
