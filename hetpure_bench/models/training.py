"""Train an eps-prediction denoiser on CIFAR-10 (resumable, with an EMA of the weights).

The loss is DDPM's simple eps-MSE, but t is drawn only from 0..t_max-1 (300 by default):
purification never starts above t ~ 250, so the result is a denoiser for t < t_max, not a
generator from pure noise.
"""

from __future__ import annotations

import json
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
from diffusers.training_utils import EMAModel
from tqdm.auto import tqdm

from ..atomic import atomic_path
from ..data import load_cifar10
from ..diffusion.networks import EMBEDDED_UNET_CONFIG, build_unet, save_unet_safetensors
from ..diffusion.schedule import VPSchedule, q_sample
from ..errors import UserError


@dataclass
class TrainConfig:
    """Settings of one training run; stored in the checkpoint so a resume continues the same run."""

    out_dir: str
    data: str | None = None
    steps: int = 20000
    batch_size: int = 64
    lr: float = 5e-4
    warmup_steps: int = 200
    grad_clip: float = 1.0
    ema_decay: float = 0.999
    t_max: int = 300
    checkpoint_every: int = 200
    seed: int = 0
    unet_config: dict = field(default_factory=lambda: dict(EMBEDDED_UNET_CONFIG))


def training_loss(
    model: torch.nn.Module,
    schedule: VPSchedule,
    x0: torch.Tensor,
    t_max: int,
    generator: torch.Generator,
) -> torch.Tensor:
    """Eps-MSE at t ~ U{0..t_max-1} for a batch of images x0 in [-1, 1]."""
    t = torch.randint(0, t_max, (x0.shape[0],), generator=generator)
    noise = torch.randn(x0.shape, generator=generator)
    x_t = q_sample(schedule, x0, t, noise=noise)
    return torch.nn.functional.mse_loss(model(x_t, t).sample, noise)


def augmented_batch(images_uint8: torch.Tensor, batch_size: int, generator: torch.Generator) -> torch.Tensor:
    """A random batch (drawn with replacement) in [-1, 1], each image flipped left-right with p = 1/2."""
    x0 = images_uint8[torch.randint(0, len(images_uint8), (batch_size,), generator=generator)]
    x0 = x0.float().div(127.5).sub(1.0)
    flip = torch.rand(batch_size, generator=generator) < 0.5
    return torch.where(flip[:, None, None, None], x0.flip(-1), x0)


def train_denoiser(config: TrainConfig) -> Path:
    """Train (or resume) into ``config.out_dir``; return the path of ``last.pt``.

    ``last.pt`` holds the weights, the EMA, the optimiser, the step, the RNG state and the
    accumulated wall time; it is rewritten atomically every ``checkpoint_every`` steps.
    """
    out = Path(config.out_dir)
    out.mkdir(parents=True, exist_ok=True)
    last = out / "last.pt"
    with torch.random.fork_rng():  # a seeded initialisation without touching the global RNG
        torch.manual_seed(config.seed)
        unet = build_unet(config.unet_config)
    optimizer = torch.optim.AdamW(unet.parameters(), lr=config.lr, weight_decay=0.0)
    ema = EMAModel(unet.parameters(), decay=config.ema_decay)  # decay warms up as (1+n)/(10+n)
    generator = torch.Generator().manual_seed(config.seed)
    step, wall = 0, 0.0
    if last.exists():
        state = torch.load(last, map_location="cpu", weights_only=True)
        saved = state["config"]
        if saved["unet_config"] != config.unet_config or saved["t_max"] != config.t_max:
            raise UserError(f"{last} was trained with another architecture or t_max; use a new --out")
        unet.load_state_dict(state["model"])
        optimizer.load_state_dict(state["optimizer"])
        ema.load_state_dict(state["ema"])
        generator.set_state(state["rng"])
        step, wall = state["step"], state["wall_seconds"]
    if step >= config.steps:
        return last

    data = load_cifar10(config.data, split="train")
    schedule = VPSchedule()
    unet.train()
    started = time.perf_counter()
    losses: list[float] = []
    with open(out / "train_log.jsonl", "a") as log, tqdm(
        total=config.steps, initial=step, desc="train denoiser", unit="step"
    ) as bar:
        while step < config.steps:
            for group in optimizer.param_groups:
                group["lr"] = config.lr * min(1.0, (step + 1) / config.warmup_steps)
            x0 = augmented_batch(data.images, config.batch_size, generator)
            loss = training_loss(unet, schedule, x0, config.t_max, generator)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(unet.parameters(), config.grad_clip)
            optimizer.step()
            ema.step(unet.parameters())
            step += 1
            losses.append(loss.item())
            bar.update(1)
            bar.set_postfix(loss=f"{losses[-1]:.4f}")
            if step % config.checkpoint_every == 0 or step == config.steps:
                elapsed = wall + time.perf_counter() - started
                state = {
                    "model": unet.state_dict(), "optimizer": optimizer.state_dict(),
                    "ema": ema.state_dict(), "rng": generator.get_state(), "step": step,
                    "wall_seconds": elapsed, "config": asdict(config), "data_source": data.source,
                }
                with atomic_path(last) as tmp:
                    torch.save(state, tmp)
                mean_loss = sum(losses) / len(losses)
                log.write(json.dumps({"step": step, "loss": mean_loss, "lr": optimizer.param_groups[0]["lr"], "wall_seconds": elapsed}) + "\n")
                log.flush()
                losses.clear()
    return last


def export_ema(checkpoint: Path, dest: Path) -> dict:
    """Write the EMA weights of a training checkpoint as fp16 safetensors; return the info stored."""
    try:
        state = torch.load(checkpoint, map_location="cpu", weights_only=True)
        config = state["config"]
    except (OSError, RuntimeError, KeyError, EOFError) as exc:
        raise UserError(f"cannot read training checkpoint {checkpoint}: {exc}") from None
    unet = build_unet(config["unet_config"])
    ema = EMAModel(unet.parameters(), decay=config["ema_decay"])
    ema.load_state_dict(state["ema"])
    ema.copy_to(unet.parameters())
    info = {
        "weights": "EMA", "steps": state["step"], "batch_size": config["batch_size"],
        "lr": config["lr"], "ema_decay": config["ema_decay"], "t_max": config["t_max"],
        "training_data": state["data_source"], "wall_seconds": round(state["wall_seconds"], 1),
    }
    save_unet_safetensors(unet, config["unet_config"], Path(dest), info)
    return info
