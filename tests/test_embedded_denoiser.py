"""The committed denoiser: loadable offline, small, and actually useful as a purifier."""

import pytest

from hetpure_bench.data import load_cifar10
from hetpure_bench.diffusion.denoiser_quality import evaluate_denoiser
from hetpure_bench.models.classifiers import load_classifier
from hetpure_bench.models.diffusion_zoo import DIFFUSION_MODELS, embedded_denoiser_path, load_diffusion_model


def test_embedded_denoiser_file_is_small_and_described():
    assert DIFFUSION_MODELS.get("embedded-denoiser").available()
    assert embedded_denoiser_path().stat().st_size <= 20 * 2**20
    model = load_diffusion_model("embedded-denoiser")
    assert 3.5e6 < sum(p.numel() for p in model.parameters()) < 3.7e6
    assert model.metadata["weights"] == "EMA" and model.metadata["t_max"] == 300
    assert model.metadata["training_data"] == "cifar10-jpeg"
    assert not any(p.requires_grad for p in model.parameters())


def _evaluate(shared_jpeg, n):
    data = load_cifar10(str(shared_jpeg), "test").subset(n, seed=0)
    return evaluate_denoiser(
        load_diffusion_model("embedded-denoiser"), load_classifier("resnet18-pyautoattack"),
        data.as_float(), data.labels, psnr_times=[100, 200], purify_t=100, purify_stride=10, seed=0,
    )


def test_embedded_denoiser_denoises(shared_jpeg):
    result = _evaluate(shared_jpeg, 64)
    for t in (100, 200):
        psnr = result["one_step_psnr_db"][t]
        assert psnr["x0_prediction"] > psnr["noisy_input"] + 6  # dB
    assert result["accuracy_purified"] >= 0.5


@pytest.mark.slow
def test_embedded_denoiser_meets_the_purification_goal(shared_jpeg):
    # Issue #2's goal: DDIM from t = 100 (10 steps) then the ResNet-18 keeps >= 78% on 512 images.
    result = _evaluate(shared_jpeg, 512)
    assert result["accuracy_purified"] >= 0.78
