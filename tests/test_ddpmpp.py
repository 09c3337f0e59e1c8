import math
from dataclasses import replace

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


def save_score_sde_format(model: DDPMpp, shadow: list[torch.Tensor], path) -> None:
    """What score_sde's save_checkpoint writes: a DataParallel state dict and the EMA state."""
    torch.save(
        {
            "model": torch.nn.DataParallel(model).state_dict(),
            "ema": {"decay": 0.9999, "num_updates": 3, "shadow_params": shadow},
            "optimizer": {},
            "step": 0,
        },
        path,
    )


def ema_like(model: DDPMpp) -> list[torch.Tensor]:
    """Shadow params that differ from the model's weights, in parameters() order."""
    generator = torch.Generator().manual_seed(2)
    return [p.detach() + 0.05 * torch.randn(p.shape, generator=generator) for p in model.parameters()]


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
    model = tiny_model()
    shadow = ema_like(model)
    save_score_sde_format(model, shadow, tmp_path / "checkpoint_8.pth")

    loaded = load_score_sde_checkpoint(tmp_path / "checkpoint_8.pth", TINY)

    expected = tiny_model()
    with torch.no_grad():
        for param, value in zip(expected.parameters(), shadow):
            param.copy_(value)
    x, t = inputs()
    assert not loaded.training and not any(p.requires_grad for p in loaded.parameters())
    with torch.no_grad():
        out = loaded(x, t)
        assert torch.equal(out, expected(x, t))
        assert not torch.allclose(out, model(x, t))  # the raw "model" weights were not used


def test_truncated_checkpoint_is_a_user_error(tmp_path):
    model = tiny_model()
    path = tmp_path / "checkpoint_8.pth"
    save_score_sde_format(model, ema_like(model), path)
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
    model = tiny_model()
    path = tmp_path / "checkpoint_8.pth"
    save_score_sde_format(model, ema_like(model)[:-1], path)
    with pytest.raises(UserError, match=r"EMA has \d+ tensors, expected \d+") as error:
        load_score_sde_checkpoint(path, TINY)
    assert str(path) in str(error.value)


def test_shadow_tensor_of_wrong_shape_is_a_user_error(tmp_path):
    model = tiny_model()
    shadow = ema_like(model)
    shadow[5] = shadow[5].flatten()[:-1]
    path = tmp_path / "checkpoint_8.pth"
    save_score_sde_format(model, shadow, path)
    with pytest.raises(UserError, match="expected") as error:
        load_score_sde_checkpoint(path, TINY)
    assert str(path) in str(error.value)


def test_checkpoint_of_another_config_is_a_user_error(tmp_path):
    model = tiny_model()
    path = tmp_path / "checkpoint_8.pth"
    save_score_sde_format(model, ema_like(model), path)
    with pytest.raises(UserError, match="does not fit the DDPM\\+\\+ config") as error:
        load_score_sde_checkpoint(path, replace(TINY, num_res_blocks=2))
    assert str(path) in str(error.value)


def test_checkpoint_without_ema_is_a_user_error(tmp_path):
    path = tmp_path / "checkpoint_8.pth"
    torch.save({"model": tiny_model().state_dict(), "optimizer": {}, "step": 0}, path)
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
