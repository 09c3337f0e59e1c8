import subprocess
import sys

import pytest

from hetpure_bench.cli import main
from hetpure_bench.diffusion.networks import load_unet_safetensors
from test_training import _train_tar


def _run_module(*args):
    return subprocess.run([sys.executable, "-m", "hetpure_bench", *args], capture_output=True, text=True, timeout=300)


def test_help_lists_the_commands():
    result = _run_module("--help")
    assert result.returncode == 0
    for command in ("list", "train-denoiser", "export-denoiser", "eval-denoiser"):
        assert command in result.stdout


def test_bad_data_path_is_one_line_and_exit_2(tmp_path):
    result = _run_module("eval-denoiser", "--data", str(tmp_path / "missing"))
    assert result.returncode == 2
    assert "Traceback" not in result.stderr
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("hetpure_bench: error: data path")


def test_list_shows_registered_models_and_availability(capsys):
    assert main(["list"]) == 0
    out = capsys.readouterr().out
    assert "resnet18-pyautoattack" in out and "embedded-denoiser" in out
    assert "available offline" in out and "official" in out


@pytest.mark.parametrize(
    "args, message",
    [
        (["eval-denoiser", "--classifier", "resnet18"], "unknown classifier 'resnet18'; did you mean 'resnet18-pyautoattack'"),
        (["eval-denoiser", "--diffusion-model", "embeded-denoiser"], "did you mean 'embedded-denoiser'"),
        (["export-denoiser", "/nonexistent/last.pt", "/tmp/x.safetensors"], "cannot read training checkpoint"),
    ],
)
def test_bad_names_exit_2(capsys, args, message):
    assert main(args) == 2
    err = capsys.readouterr().err
    assert message in err and err.count("\n") == 1


def test_train_denoiser_command_trains_resumes_and_exports(tmp_path, capsys):
    _train_tar(tmp_path / "train.tar", n=10)
    args = ["train-denoiser", "--out", str(tmp_path / "run"), "--data", str(tmp_path / "train.tar"),
            "--batch-size", "2", "--checkpoint-every", "1"]
    assert main(args + ["--steps", "1"]) == 0
    assert main(args + ["--steps", "2"]) == 0  # resumes from step 1
    assert "after 2 steps" in capsys.readouterr().out
    model = load_unet_safetensors(tmp_path / "run" / "denoiser.safetensors")
    assert model.metadata["steps"] == 2 and model.metadata["training_data"] == "imagefolder"
