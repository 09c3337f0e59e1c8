import pytest
import torch
from diffusers import UNet2DModel
from tiny_models import TINY_UNET

from hetpure_bench.errors import ChecksumError
from hetpure_bench.models import diffusion_zoo as zoo
from hetpure_bench.models.artifacts import MissingArtifactError, get_artifact
from hetpure_bench.models.diffusion_zoo import DDPM_CIFAR10_CONFIG, DIFFUSION_MODELS, load_diffusion_model


def test_ddpm_cifar10_architecture_has_the_published_size():
    with torch.device("meta"):
        unet = UNet2DModel(**DDPM_CIFAR10_CONFIG)
    assert sum(p.numel() for p in unet.parameters()) == 35_746_307 == DIFFUSION_MODELS.get("ddpm-cifar10").info["parameters"]


def test_diffusers_folder_goes_through_the_real_loading_path(monkeypatch):
    monkeypatch.setattr(zoo, "ddpm_cifar10_folder", lambda: _cached_folder())
    torch.manual_seed(0)
    tiny = UNet2DModel(**TINY_UNET)
    folder = get_artifact("google-ddpm-cifar10-32-weights").local_path.parent
    tiny.save_pretrained(str(folder), safe_serialization=False)  # config.json + diffusion_pytorch_model.bin
    assert (folder / "diffusion_pytorch_model.bin").is_file()
    model = load_diffusion_model("gdmp-ddpm")
    x = torch.randn(2, 3, 8, 8)
    with torch.no_grad():
        torch.testing.assert_close(model(x, 5), tiny(x, torch.tensor([5, 5])).sample)
    assert not model.training and not any(p.requires_grad for p in model.parameters())
    (folder / "diffusion_pytorch_model.bin").write_bytes(b"\x80\x02 truncated")
    with pytest.raises(ChecksumError, match="not a loadable diffusers"):
        load_diffusion_model("ddpm-cifar10")


def _cached_folder():
    return get_artifact("google-ddpm-cifar10-32-weights").local_path.parent


def test_offline_without_a_copy_names_the_file_url_and_place(monkeypatch):
    import dataclasses

    from hetpure_bench.models import artifacts

    real = artifacts.artifact_index()
    unreachable = {k: dataclasses.replace(v, url="http://127.0.0.1:9/" + v.path) for k, v in real.items()}
    monkeypatch.setattr(artifacts, "artifact_index", lambda: unreachable)
    with pytest.raises(MissingArtifactError) as info:
        load_diffusion_model("ddpm-cifar10")
    message = str(info.value)
    assert "http://127.0.0.1:9/ddpm-cifar10-32/config.json" in message
    assert str(unreachable["google-ddpm-cifar10-32-config"].local_path) in message and "\n" not in message


def test_score_sde_checkpoint_is_converted_once_and_loaded_from_the_cache(monkeypatch):
    from hetpure_bench.diffusion import ddpmpp
    from hetpure_bench.diffusion.ddpmpp import DDPMpp

    tiny = ddpmpp.DDPMppConfig(image_size=8, nf=8, ch_mult=(1, 2), num_res_blocks=1, attn_resolutions=(4,))
    monkeypatch.setattr(zoo, "score_sde_config", lambda: tiny)
    torch.manual_seed(0)
    model = DDPMpp(tiny)
    shadow = [p.detach() + 0.01 for p in model.parameters()]
    path = get_artifact("score-sde-ddpmpp-deep-continuous").local_path
    path.parent.mkdir(parents=True, exist_ok=True)
    state = {"module." + k: v for k, v in model.state_dict().items()}
    torch.save({"model": state, "ema": {"decay": 0.9999, "num_updates": 1, "shadow_params": shadow}, "optimizer": {}, "step": 0}, path)
    loaded = load_diffusion_model("score-sde-ddpmpp")
    assert zoo.score_sde_safetensors().is_file()
    assert torch.equal(next(loaded.parameters()), shadow[0])  # the EMA weights
    path.unlink()  # from now on only the converted cache is needed
    again = load_diffusion_model("score-sde-ddpmpp")
    x = torch.randn(1, 3, tiny.image_size, tiny.image_size)
    with torch.no_grad():
        torch.testing.assert_close(again(x, 10), loaded(x, 10))


def test_score_sde_missing_is_one_line_with_the_url():
    with pytest.raises(MissingArtifactError, match="download it by hand from https://drive.google.com") as info:
        load_diffusion_model("score-sde-ddpmpp")
    assert "\n" not in str(info.value)
