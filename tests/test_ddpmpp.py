import math
from dataclasses import replace

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from hetpure_bench.diffusion.ddpmpp import (
    AttnBlock,
    DDPMpp,
    DDPMppConfig,
    convert_to_safetensors,
    count_parameters,
    load_ddpmpp_safetensors,
    load_score_sde_checkpoint,
)
from hetpure_bench.errors import UserError

# Two levels (8x8, 4x4) with attention at 4x4: every kind of layer, including the down and up
# resblocks and the channel-changing 1x1 shortcuts, at a size that runs in milliseconds.
TINY = DDPMppConfig(image_size=8, nf=8, ch_mult=(1, 2), num_res_blocks=1, attn_resolutions=(4,))


@pytest.fixture(autouse=True)
def _one_thread():
    # The tensors here are tiny: on 2 busy cores, thread hand-offs cost more than the work
    # (a tiny forward took 1.3 s with 2 threads and 2 ms with 1).
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def tiny_model(seed: int = 0) -> DDPMpp:
    torch.manual_seed(seed)
    return DDPMpp(TINY).eval()


def inputs(batch: int = 2) -> tuple[torch.Tensor, torch.Tensor]:
    generator = torch.Generator().manual_seed(1)
    x = torch.rand(batch, 3, 8, 8, generator=generator) * 2 - 1
    return x, torch.tensor([10, 700][:batch])


class ScoreSdeNCSNpp(DDPMpp):
    """score_sde's NCSN++ as its state dict shows it: these layers plus the ``sigmas`` buffer it
    registers (float64 VE noise levels, score_sde's get_sigmas: geometric from 50 to 0.01)."""

    def __init__(self, config: DDPMppConfig):
        super().__init__(config)
        self.register_buffer("sigmas", torch.tensor(np.exp(np.linspace(np.log(50.0), np.log(0.01), 1000))))


class ScoreSdeEMA:
    """score_sde's ExponentialMovingAverage (models/ema.py): shadow copies of the trainable
    parameters, moved towards them after each step with decay min(decay, (1 + n) / (10 + n))."""

    def __init__(self, parameters, decay: float = 0.9999):
        self.decay, self.num_updates = decay, 0
        self.shadow_params = [p.clone().detach() for p in parameters if p.requires_grad]

    def update(self, parameters) -> None:
        self.num_updates += 1
        decay = min(self.decay, (1 + self.num_updates) / (10 + self.num_updates))
        with torch.no_grad():
            for shadow, param in zip(self.shadow_params, [p for p in parameters if p.requires_grad]):
                shadow.sub_((1 - decay) * (shadow - param))

    def state_dict(self) -> dict:
        return {"decay": self.decay, "num_updates": self.num_updates, "shadow_params": self.shadow_params}


def score_sde_checkpoint(steps: int = 3) -> tuple[dict, DDPMpp, list[torch.Tensor]]:
    """What score_sde's run_lib.train and utils.save_checkpoint write after ``steps`` training
    steps (continuous VP denoising loss, Adam, EMA), with the raw model and the EMA weights."""
    torch.manual_seed(0)
    model = torch.nn.DataParallel(ScoreSdeNCSNpp(TINY))  # score_sde's create_model wraps it
    ema = ScoreSdeEMA(model.parameters())
    optimizer = torch.optim.Adam(model.parameters(), lr=0.05, betas=(0.9, 0.999), eps=1e-8, weight_decay=0)
    generator = torch.Generator().manual_seed(1)
    for _ in range(steps):
        x0 = torch.rand(2, 3, 8, 8, generator=generator) * 2 - 1
        noise, t = torch.randn(x0.shape, generator=generator), torch.rand(2, generator=generator)
        abar = torch.exp(-0.5 * t**2 * 19.9 - 0.1 * t)[:, None, None, None]
        loss = ((model(abar.sqrt() * x0 + (1 - abar).sqrt() * noise, 999 * t) - noise) ** 2).mean()
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        ema.update(model.parameters())
    saved = {"optimizer": optimizer.state_dict(), "model": model.state_dict(), "ema": ema.state_dict(), "step": steps}
    return saved, model.module.eval(), ema.shadow_params


def write_checkpoint(path, saved: dict) -> None:
    torch.save(saved, path)


def test_tiny_forward_shape_and_determinism():
    model = tiny_model()
    x, t = inputs()
    with torch.no_grad():
        out = model(x, t)
        assert out.shape == x.shape and torch.isfinite(out).all()
        assert torch.equal(out, model(x, t))  # eval mode: dropout is off
        assert not torch.allclose(out, model(x, torch.tensor([500, 500])))  # t conditions the output
        assert torch.equal(model(x, t.float()), out)  # integer and float labels embed alike


def test_centered_false_maps_unit_interval_to_symmetric():
    x, t = inputs()
    centered = tiny_model()
    uncentered = DDPMpp(replace(TINY, centered=False)).eval()
    uncentered.load_state_dict(centered.state_dict())
    with torch.no_grad():
        torch.testing.assert_close(uncentered((x + 1) / 2, t), centered(x, t))


def test_attention_is_softmax_of_scaled_query_key_products():
    torch.manual_seed(0)
    block = AttnBlock(8)
    x = torch.randn(2, 8, 4, 4)
    with torch.no_grad():
        h = block.GroupNorm_0(x)
        q, k, v = (
            torch.einsum("bchw,co->bohw", h, nin.W).flatten(2) + nin.b[:, None]
            for nin in (block.NIN_0, block.NIN_1, block.NIN_2)
        )
        weights = F.softmax(torch.einsum("bcn,bcm->bnm", q, k) / math.sqrt(8), dim=-1)
        attended = torch.einsum("bnm,bcm->bcn", weights, v).reshape(2, 8, 4, 4)
        out = torch.einsum("bchw,co->bohw", attended, block.NIN_3.W) + block.NIN_3.b[:, None, None]
        torch.testing.assert_close(block(x), (x + out) / math.sqrt(2))


def test_real_config_has_the_published_size_and_score_sde_layout():
    # 106,632,579 (the published "106.6M") was cross-checked by summing, with plain arithmetic,
    # the layer shapes that score_sde's construction rules give.
    assert count_parameters(DDPMppConfig()) == 106_632_579
    with torch.device("meta"):
        model = DDPMpp()
    shapes = {name: tuple(p.shape) for name, p in model.state_dict().items()}
    assert len(model.all_modules) == 91 and len(shapes) == 956 and not list(model.buffers())
    assert shapes["all_modules.0.weight"] == (512, 128)  # the time-embedding MLP comes first
    assert shapes["all_modules.2.weight"] == (128, 3, 3, 3)  # then the input conv
    assert shapes["all_modules.3.Dense_0.weight"] == (128, 512)
    assert shapes["all_modules.11.Conv_2.weight"] == (128, 128, 1, 1)  # the 32 -> 16 down-resblock
    assert shapes["all_modules.12.Conv_2.weight"] == (256, 128, 1, 1)  # first 16x16 block widens
    assert shapes["all_modules.13.NIN_3.W"] == (256, 256)  # attention follows each 16x16 block
    assert shapes["all_modules.90.weight"] == (3, 128, 3, 3)
    assert list(shapes)[-4:] == [f"all_modules.{i}.{p}" for i in (89, 90) for p in ("weight", "bias")]


def test_score_sde_checkpoint_loads_the_ema_weights(tmp_path):
    saved, raw, shadow = score_sde_checkpoint()
    path = tmp_path / "checkpoint_8.pth"
    write_checkpoint(path, saved)
    on_disk = torch.load(path, weights_only=True)  # the file is plain tensors and containers
    assert on_disk["model"]["module.sigmas"].dtype == torch.float64 and on_disk["model"]["module.sigmas"].shape == (1000,)
    assert len(on_disk["model"]) == len(shadow) + 1 and on_disk["optimizer"]["state"]

    loaded = load_score_sde_checkpoint(path, TINY)

    assert not loaded.training and not any(p.requires_grad for p in loaded.parameters())
    assert not list(loaded.buffers())
    for param, value in zip(loaded.parameters(), shadow, strict=True):
        assert torch.equal(param, value)
    expected = tiny_model()
    with torch.no_grad():
        for param, value in zip(expected.parameters(), shadow):
            param.copy_(value)
    x, t = inputs()
    with torch.no_grad():
        out = loaded(x, t)
        assert torch.equal(out, expected(x, t))
        assert (out - raw(x, t)).abs().max() > 1e-3  # the raw "model" weights were not used


def test_another_unexpected_model_key_is_still_refused(tmp_path):
    saved, _, _ = score_sde_checkpoint(steps=1)
    saved["model"]["module.extra_buffer"] = torch.zeros(3)
    path = tmp_path / "checkpoint_8.pth"
    write_checkpoint(path, saved)
    with pytest.raises(UserError, match=r"unexpected \['extra_buffer'\]") as error:
        load_score_sde_checkpoint(path, TINY)
    assert str(path) in str(error.value) and "\n" not in str(error.value)


class Pickled:
    """An arbitrary object: torch.load(weights_only=True) refuses to unpickle it."""


def test_checkpoint_is_read_with_weights_only(tmp_path):
    saved, _, _ = score_sde_checkpoint(steps=1)
    saved["step"] = Pickled()
    path = tmp_path / "checkpoint_8.pth"
    write_checkpoint(path, saved)
    with pytest.raises(UserError, match="not a readable PyTorch file"):
        load_score_sde_checkpoint(path, TINY)


def test_truncated_checkpoint_is_a_user_error(tmp_path):
    path = tmp_path / "checkpoint_8.pth"
    write_checkpoint(path, score_sde_checkpoint(steps=1)[0])
    path.write_bytes(path.read_bytes()[:1000])
    with pytest.raises(UserError, match="not a readable PyTorch file") as error:
        load_score_sde_checkpoint(path, TINY)
    assert str(path) in str(error.value) and "\n" not in str(error.value)


def test_html_page_saved_as_checkpoint_is_a_user_error(tmp_path):
    path = tmp_path / "checkpoint_8.pth"
    path.write_text("<!DOCTYPE html><html><body>Sign in to continue</body></html>")
    with pytest.raises(UserError, match="not a readable PyTorch file") as error:
        load_score_sde_checkpoint(path, TINY)
    assert str(path) in str(error.value) and "\n" not in str(error.value)


def test_shadow_list_of_wrong_length_is_a_user_error(tmp_path):
    saved, _, _ = score_sde_checkpoint(steps=1)
    saved["ema"]["shadow_params"] = saved["ema"]["shadow_params"][:-1]
    path = tmp_path / "checkpoint_8.pth"
    write_checkpoint(path, saved)
    with pytest.raises(UserError, match=r"EMA has \d+ tensors, expected \d+") as error:
        load_score_sde_checkpoint(path, TINY)
    assert str(path) in str(error.value)


def test_shadow_tensor_of_wrong_shape_is_a_user_error(tmp_path):
    saved, _, _ = score_sde_checkpoint(steps=1)
    shadow = saved["ema"]["shadow_params"]
    shadow[5] = shadow[5].flatten()[:-1]
    path = tmp_path / "checkpoint_8.pth"
    write_checkpoint(path, saved)
    with pytest.raises(UserError, match="expected") as error:
        load_score_sde_checkpoint(path, TINY)
    assert str(path) in str(error.value)


def test_checkpoint_of_another_config_is_a_user_error(tmp_path):
    path = tmp_path / "checkpoint_8.pth"
    write_checkpoint(path, score_sde_checkpoint(steps=1)[0])
    with pytest.raises(UserError, match="does not fit the DDPM\\+\\+ config") as error:
        load_score_sde_checkpoint(path, replace(TINY, num_res_blocks=2))
    assert str(path) in str(error.value)


def test_checkpoint_without_ema_is_a_user_error(tmp_path):
    saved, _, _ = score_sde_checkpoint(steps=1)
    del saved["ema"]
    path = tmp_path / "checkpoint_8.pth"
    write_checkpoint(path, saved)
    with pytest.raises(UserError, match="lacks"):
        load_score_sde_checkpoint(path, TINY)


def test_safetensors_conversion_round_trip(tmp_path):
    model = tiny_model()
    dest = tmp_path / "cache" / "ddpmpp.safetensors"
    convert_to_safetensors(model, dest)
    loaded = load_ddpmpp_safetensors(dest)
    assert loaded.config == TINY and not loaded.training
    assert not any(p.requires_grad for p in loaded.parameters())
    assert [p.name for p in tmp_path.joinpath("cache").iterdir()] == ["ddpmpp.safetensors"]  # no temp left
    x, t = inputs()
    with torch.no_grad():
        assert torch.equal(loaded(x, t), model(x, t))


def test_corrupt_safetensors_is_a_user_error(tmp_path):
    path = tmp_path / "ddpmpp.safetensors"
    path.write_text("<html>404</html>")
    with pytest.raises(UserError, match="corrupt"):
        load_ddpmpp_safetensors(path)
