import torch
from conftest import write_image_tar
from test_networks import TINY

from hetpure_bench.diffusion.networks import load_unet_safetensors
from hetpure_bench.models.training import TrainConfig, export_ema, train_denoiser

TINY32 = {**TINY, "sample_size": 32}


def _train_tar(path, n=20):
    return write_image_tar(path, n, "train")


def _config(tmp_path, out, steps):
    return TrainConfig(
        out_dir=str(tmp_path / out), data=str(tmp_path / "train.tar"), steps=steps, batch_size=4,
        checkpoint_every=2, warmup_steps=2, unet_config=TINY32,
    )


def test_resume_gives_the_same_weights_as_an_uninterrupted_run(tmp_path):
    _train_tar(tmp_path / "train.tar")
    straight = torch.load(train_denoiser(_config(tmp_path, "a", 4)), weights_only=True)
    train_denoiser(_config(tmp_path, "b", 2))  # "crash" after step 2 ...
    resumed = torch.load(train_denoiser(_config(tmp_path, "b", 4)), weights_only=True)  # ... resume
    assert straight["step"] == resumed["step"] == 4
    for key, value in straight["model"].items():
        torch.testing.assert_close(resumed["model"][key], value, rtol=0, atol=0)
    for a, b in zip(straight["ema"]["shadow_params"], resumed["ema"]["shadow_params"]):
        torch.testing.assert_close(a, b, rtol=0, atol=0)


def test_training_moves_the_weights_and_exports_the_ema(tmp_path):
    _train_tar(tmp_path / "train.tar")
    last = train_denoiser(_config(tmp_path, "run", 2))
    state = torch.load(last, weights_only=True)
    info = export_ema(last, tmp_path / "ema.safetensors")
    assert info["steps"] == 2 and info["t_max"] == 300 and info["training_data"] == "imagefolder"
    model = load_unet_safetensors(tmp_path / "ema.safetensors")
    # EMA decay warms up as (1+n)/(10+n): after 2 steps the EMA is 0.2 * w1 + ... , i.e. it is
    # neither the initial nor the final weights; check it equals the stored shadow (fp16).
    shadow = state["ema"]["shadow_params"]
    for param, expected in zip(model.network.parameters(), shadow):
        torch.testing.assert_close(param, expected.half().float())
    assert (tmp_path / "run" / "train_log.jsonl").read_text().count("\n") == 1
