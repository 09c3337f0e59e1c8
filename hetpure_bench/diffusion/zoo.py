"""The diffusion-model registry: every entry builds an ``EpsModel`` (x_t in [-1,1], t -> eps)."""

from __future__ import annotations

from importlib import resources
from pathlib import Path

from ..registry import Registry
from .networks import EpsModel, load_unet_safetensors

DIFFUSION_MODELS: Registry[EpsModel] = Registry("diffusion model")

EMBEDDED_DENOISER_FILE = "embedded_denoiser.safetensors"


def embedded_denoiser_path() -> Path:
    return Path(str(resources.files("hetpure_bench") / "weights" / EMBEDDED_DENOISER_FILE))


DIFFUSION_MODELS.register(
    "embedded-denoiser",
    lambda: load_unet_safetensors(embedded_denoiser_path()),
    available=lambda: embedded_denoiser_path().is_file(),
    architecture="diffusers UNet2DModel (32,64,128), 2 res-blocks per level, no attention, 3.6M params",
    prediction="eps",
    trained_timesteps="0..299 of the linear schedule: a denoiser for t < 300, not a generator",
    training_data="cifar10-jpeg train split (50,000 images), trained here (hetpure_bench train-denoiser)",
    source="committed with the package (fp16 safetensors)",
)


def load_diffusion_model(name: str) -> EpsModel:
    """Build a registered diffusion model in eval mode with frozen parameters."""
    model = DIFFUSION_MODELS.build(name)
    model.requires_grad_(False)
    return model.eval()
