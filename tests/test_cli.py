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
    assert "hetpure" in out and "diffpure" in out


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


def test_run_command_writes_leaderboard_and_per_image_results(tmp_path, shared_jpeg, capsys):
    common = ["--data", str(shared_jpeg), "-n", "2", "--steps", "1", "--eot", "1", "--batch-size", "2",
              "--leaderboard-dir", str(tmp_path / "lb"), "--runs-dir", str(tmp_path / "runs")]
    assert main(["run", "--defense", "hetpure", "--defense-arg", "stride=100", "--evaluation", "single,worst:2"] + common) == 0
    assert main(["run", "--defense", "none"] + common) == 0
    out = capsys.readouterr().out
    assert "hetpure [t_l=200 t_s=100 stride=100" in out and "NFE 2" in out
    csv = (tmp_path / "lb" / "cifar10-jpeg-Linf.csv").read_text()
    assert csv.count("\n") == 4 and "resnet18-pyautoattack" in csv and "PGD-EOT(Linf, 1 steps, EOT 1)" in csv
    assert ",single," in csv and ",worst:2," in csv  # one attack, a row per evaluation mode
    folders = sorted((tmp_path / "runs").glob("hetpure-cifar10-jpeg-Linf-seed0-*"))
    assert len(folders) == 2  # one per evaluation mode: rows never overwrite each other
    per_image = (folders[0] / "per_image.csv").read_text()
    assert per_image.splitlines()[0] == "index,label,clean_pred,adv_pred,clean_correct,robust_correct"


@pytest.mark.parametrize(
    "args, message",
    [
        (["run", "--defense", "hetpur"], "did you mean 'hetpure'"),
        (["run", "--defense", "hetpure", "--eps", "2"], "out of range for Linf"),
        (["run", "--defense", "hetpure", "--gradient", "bpda:2"], "unknown gradient mode"),
        (["run", "--defense", "hetpure", "--attack", "autoatack"], "did you mean 'autoattack'"),
        (["run", "--defense", "hetpure", "--attack", "torchattacks", "--attack-arg", "attack=PDG"], "unknown torchattacks attack"),
        (["run", "--defense", "hetpure", "--attack-arg", "steps"], "--attack-arg needs KEY=VALUE"),
        (["run", "--defense", "diffpure", "--mask-aware"], "no attention mask"),
        (["run", "--defense", "hetpure", "--evaluation", "worst:0"], "unknown evaluation mode"),
        (["run", "--defense", "hetpure", "--sanity-images", "-1"], "sanity needs images >= 0"),
        (["run", "--defense", "hetpure", "--evaluation", "vote"], "unknown evaluation mode"),
        (["run", "--defense", "hetpure", "--preset", "nope"], "unknown preset"),
        (["run", "--defense", "hetpure", "--defense-arg", "t_l"], "KEY=VALUE"),
        (["run", "--defense", "hetpure", "--defense-arg", "tl=3"], "no setting 'tl'"),
    ],
)
def test_run_bad_input_exits_2_before_work(capsys, args, message):
    assert main(args) == 2
    err = capsys.readouterr().err
    assert message in err and err.count("\n") == 1


def test_run_refuses_an_unwritable_leaderboard_dir(tmp_path, capsys):
    blocker = tmp_path / "file"
    blocker.write_text("x")
    assert main(["run", "--defense", "none", "--leaderboard-dir", str(blocker / "sub")]) == 2
    assert "cannot write" in capsys.readouterr().err


def test_run_several_defenses_validates_all_before_running(capsys):
    assert main(["run", "--defense", "none,hetpure,repaint-x"]) == 2
    assert "unknown defense 'repaint-x'" in capsys.readouterr().err
