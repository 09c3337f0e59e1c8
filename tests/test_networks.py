import math

import pytest
import torch

from hetpure_bench.diffusion.networks import EpsModel, build_unet, load_unet_safetensors, save_unet_safetensors
from hetpure_bench.errors import UserError

TINY = {
    "sample_size": 8, "in_channels": 3, "out_channels": 3, "block_out_channels": [8, 16],
    "layers_per_block": 1, "down_block_types": ["DownBlock2D", "DownBlock2D"],
    "up_block_types": ["UpBlock2D", "UpBlock2D"], "norm_num_groups": 4,
}


def test_safetensors_round_trip(tmp_path):
    torch.manual_seed(0)
    unet = build_unet(TINY)
    save_unet_safetensors(unet, TINY, tmp_path / "m.safetensors", {"steps": 7}, dtype=torch.float32)
    model = load_unet_safetensors(tmp_path / "m.safetensors")
    assert model.metadata["steps"] == 7 and model.metadata["config"] == TINY
    x = torch.randn(2, 3, 8, 8)
    torch.testing.assert_close(model(x, 5), unet(x, torch.tensor([5, 5])).sample)


def test_fp16_export_is_close(tmp_path):
    unet = build_unet(TINY)
    save_unet_safetensors(unet, TINY, tmp_path / "m.safetensors", {})
    model = load_unet_safetensors(tmp_path / "m.safetensors")
    x = torch.randn(2, 3, 8, 8)
    assert next(model.parameters()).dtype == torch.float32
    torch.testing.assert_close(model(x, 3), unet(x, torch.tensor([3, 3])).sample, atol=2e-2, rtol=2e-2)


def test_per_sample_and_scalar_t_agree():
    model = EpsModel(build_unet(TINY)).eval()
    x = torch.randn(3, 3, 8, 8)
    torch.testing.assert_close(model(x, 17), model(x, torch.tensor([17, 17, 17])))


@pytest.mark.parametrize("content", [b"", b"<html>404</html>", b"\x00" * 100])
def test_corrupt_file_is_a_user_error(tmp_path, content):
    path = tmp_path / "bad.safetensors"
    path.write_bytes(content)
    with pytest.raises(UserError, match="corrupt"):
        load_unet_safetensors(path)


def test_truncated_file_is_a_user_error(tmp_path):
    save_unet_safetensors(build_unet(TINY), TINY, tmp_path / "m.safetensors", {})
    blob = (tmp_path / "m.safetensors").read_bytes()
    (tmp_path / "m.safetensors").write_bytes(blob[: len(blob) // 2])
    with pytest.raises(UserError, match="corrupt"):
        load_unet_safetensors(tmp_path / "m.safetensors")


def test_missing_file_is_a_user_error(tmp_path):
    with pytest.raises(UserError, match="does not exist"):
        load_unet_safetensors(tmp_path / "none.safetensors")


def _tiny_ddpmpp():
    from hetpure_bench.diffusion.ddpmpp import DDPMpp, DDPMppConfig

    return DDPMpp(DDPMppConfig(image_size=8, nf=8, ch_mult=(1, 2), num_res_blocks=1, attn_resolutions=(4,)))


@pytest.mark.parametrize("kind", ["diffusers", "ddpmpp"])
def test_a_real_time_label_reaches_the_network_unrounded(kind):
    # The reverse SDE calls the network with 999 t (99.9 at t = 0.1): both networks must embed 99.9
    # itself, not 99 (truncated) or 100 (rounded).
    torch.manual_seed(0)
    network = build_unet(TINY) if kind == "diffusers" else _tiny_ddpmpp()
    first = network.time_proj if kind == "diffusers" else network.all_modules[0]  # sees the label or its embedding
    seen = []
    first.register_forward_hook(lambda module, args, out: seen.append(args[0]))
    model = EpsModel(network).eval()
    x = torch.randn(2, 3, 8, 8)
    with torch.no_grad():
        out = model(x, 99.9)
        assert not torch.allclose(out, model(x, 99)) and not torch.allclose(out, model(x, 100))
        torch.testing.assert_close(out, model(x, torch.full((2,), 99.9)))
    if kind == "diffusers":
        torch.testing.assert_close(seen[0], torch.full((2,), 99.9))
    else:  # DDPM's sinusoidal embedding, by hand: sin(t w_k), cos(t w_k), w_k = 10000^(-k / (half - 1))
        half = 4
        angles = [99.9 * 10000 ** (-k / (half - 1)) for k in range(half)]
        expected = torch.tensor([[math.sin(a) for a in angles] + [math.cos(a) for a in angles]] * 2)
        torch.testing.assert_close(seen[0], expected, rtol=1e-5, atol=1e-5)
