"""The diffusion-model registry: every entry builds an ``EpsModel`` (x_t in [-1,1], t -> eps)."""

from __future__ import annotations

from importlib import resources
from pathlib import Path

from diffusers import UNet2DModel

from ..diffusion.networks import EMBEDDED_UNET_CONFIG, EpsModel, build_unet, load_unet_safetensors
from ..errors import ChecksumError
from ..registry import Registry
from .artifacts import fetch, get_artifact

DIFFUSION_MODELS: Registry[EpsModel] = Registry("diffusion model")

EMBEDDED_DENOISER_FILE = "embedded_denoiser.safetensors"


def embedded_denoiser_path() -> Path:
    return Path(str(resources.files("hetpure_bench.models") / "weights" / EMBEDDED_DENOISER_FILE))


DIFFUSION_MODELS.register(
    "embedded-denoiser",
    lambda: load_unet_safetensors(embedded_denoiser_path()),
    available=lambda: embedded_denoiser_path().is_file(),
    architecture="diffusers UNet2DModel (32,64,128), 2 res-blocks per level, no attention, 3.6M params",
    prediction="eps",
    trained_timesteps="0..299 of the linear schedule: a denoiser for t < 300, not a generator",
    training_data="cifar10-jpeg train split (50,000 images), trained here (hetpure_bench train-denoiser)",
    source="committed with the package (fp16 safetensors)",
    build_architecture=lambda: EpsModel(build_unet(EMBEDDED_UNET_CONFIG)),
)


# google/ddpm-cifar10-32 (Ho et al.'s CIFAR-10 DDPM converted to diffusers): 35,746,307 parameters.
DDPM_CIFAR10_CONFIG = {
    "sample_size": 32, "in_channels": 3, "out_channels": 3, "block_out_channels": [128, 256, 256, 256],
    "layers_per_block": 2, "down_block_types": ["DownBlock2D", "AttnDownBlock2D", "DownBlock2D", "DownBlock2D"],
    "up_block_types": ["UpBlock2D", "UpBlock2D", "AttnUpBlock2D", "UpBlock2D"], "norm_eps": 1e-6,
    "flip_sin_to_cos": False, "freq_shift": 1,
}
DDPM_HUB_ID = "google/ddpm-cifar10-32"


def load_diffusers_unet(folder: Path) -> EpsModel:
    """A diffusers UNet2DModel folder (config.json + weights) as an eps-model."""
    try:
        unet = UNet2DModel.from_pretrained(str(folder))
    except (OSError, ValueError, RuntimeError, EnvironmentError) as exc:
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise ChecksumError(f"{folder} is not a loadable diffusers UNet2DModel folder: {first}") from None
    return EpsModel(unet, {"source": str(folder)})


def ddpm_cifar10_folder() -> Path:
    """The local folder of google/ddpm-cifar10-32: the Hugging Face hub cache when it has the
    model, else the artifact cache (downloading config and weights, checked and pinned)."""
    try:
        from huggingface_hub import snapshot_download

        return Path(snapshot_download(DDPM_HUB_ID, local_files_only=True))
    except Exception:  # not in the hub cache (or no huggingface_hub): use our own cache
        pass
    fetch("google-ddpm-cifar10-32-config")
    return fetch("google-ddpm-cifar10-32-weights").parent


def _ddpm_present() -> bool:
    return get_artifact("google-ddpm-cifar10-32-weights").local_path.is_file()


for _name, _note in (
    ("ddpm-cifar10", "Ho et al. (2020) CIFAR-10 DDPM, diffusers UNet2DModel"),
    ("gdmp-ddpm", "the same network and EMA weights as ddpm-cifar10 (GDMP's ema_cifar10, converted by diffusers)"),
):
    DIFFUSION_MODELS.register(
        _name, lambda: load_diffusers_unet(ddpm_cifar10_folder()), available=_ddpm_present,
        architecture="diffusers UNet2DModel (128,256,256,256), attention at 16x16, 35.7M params",
        parameters=35_746_307, unet_config=DDPM_CIFAR10_CONFIG, prediction="eps",
        build_architecture=lambda: EpsModel(UNet2DModel(**DDPM_CIFAR10_CONFIG)), trained_timesteps="0..999",
        source=f"{DDPM_HUB_ID} (Hugging Face hub cache or $HETPURE_HOME/ddpm-cifar10-32)", note=_note,
    )


def score_sde_safetensors() -> Path:
    return get_artifact("score-sde-ddpmpp-deep-continuous").local_path.with_name("ema.safetensors")


def load_score_sde_ddpmpp() -> EpsModel:
    """The DDPM++ EMA weights: converted once from checkpoint_8.pth to safetensors in the cache."""
    from ..diffusion.ddpmpp import convert_to_safetensors, load_ddpmpp_safetensors, load_score_sde_checkpoint

    converted = score_sde_safetensors()
    if not converted.is_file():
        checkpoint = fetch("score-sde-ddpmpp-deep-continuous")
        convert_to_safetensors(load_score_sde_checkpoint(checkpoint, score_sde_config()), converted)
    return EpsModel(load_ddpmpp_safetensors(converted), {"source": "score_sde checkpoint_8.pth (EMA)"})


def score_sde_config():
    """The checkpoint's network configuration (score_sde vp/cifar10_ddpmpp_deep_continuous)."""
    from ..diffusion.ddpmpp import DDPMppConfig

    return DDPMppConfig()


def _ddpmpp_architecture() -> EpsModel:
    from ..diffusion.ddpmpp import DDPMpp

    return EpsModel(DDPMpp(score_sde_config()))


DIFFUSION_MODELS.register(
    "score-sde-ddpmpp", load_score_sde_ddpmpp,
    available=lambda: score_sde_safetensors().is_file() or get_artifact("score-sde-ddpmpp-deep-continuous").local_path.is_file(),
    architecture="score_sde DDPM++ deep (NCSN++ config: nf 128, ch_mult 1,2,2,2, 8 res-blocks, attention at 16x16), 106.6M params",
    parameters=106_632_579, build_architecture=_ddpmpp_architecture, prediction="eps", trained_timesteps="continuous t in [0, 1], called with the label 999 t (DiffPure's reverse SDE does so)",
    source="score_sde vp/cifar10_ddpmpp_deep_continuous checkpoint_8.pth (EMA weights); the paper-grade model",
)


def load_diffusion_model(name: str) -> EpsModel:
    """Build a registered diffusion model in eval mode with frozen parameters."""
    model = DIFFUSION_MODELS.build(name)
    model.requires_grad_(False)
    return model.eval()
