import json
import re
import subprocess
import sys

import pandas as pd
import pytest
from conftest import HANG_GUARD_S
from test_training import _train_tar

from hetpure_bench.bench.store import ResultStore
from hetpure_bench.cli import main
from hetpure_bench.diffusion.networks import load_unet_safetensors


def _run_module(*args):
    return subprocess.run([sys.executable, "-m", "hetpure_bench", *args], capture_output=True, text=True,
                          timeout=HANG_GUARD_S)


def test_help_lists_the_commands():
    result = _run_module("--help")
    assert result.returncode == 0
    for command in ("list", "train-denoiser", "export-denoiser", "eval-denoiser", "compare"):
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
              "--leaderboard-dir", str(tmp_path / "lb"), "--sanity-images", "1"]
    assert main(["run", "--defense", "hetpure", "--defense-arg", "stride=100", "--evaluation", "single,worst:2"] + common) == 0
    assert main(["run", "--defense", "none"] + common) == 0
    out, err = capsys.readouterr()
    # Every phase shows progress, and the time per phase ends each command.
    for bar in ("hetpure: loading", "hetpure: attack + evaluate", "evaluate clean + 1 attack's examples, 2 passes each",
                "hetpure: sanity checks", "unbounded-undefended (1 images)"):
        assert bar in err, bar
    assert len(re.findall(r"time per phase: loading [0-9.]+ s, attack \+ evaluate [0-9.]+ s, sanity checks [0-9.]+ s, "
                          r"leaderboard [0-9.]+ s; total [0-9.]+ s", out)) == 2
    assert "hetpure [t_l=200 t_s=100 stride=100" in out and "NFE 2" in out and "images/s, peak" in out
    assert out.count("(%, Wilson 95%, n = 2)") == 3
    # Wilson at 0, 1 or 2 of 2 images: [0, 65.8], [9.5, 90.5], [34.2, 100].
    wilson = r"(0\.0 \[0\.0, 65\.8\]|50\.0 \[9\.5, 90\.5\]|100\.0 \[34\.2, 100\.0\])"
    assert len(re.findall(rf"clean {wilson}  robust {wilson} \(%", out)) == 3
    csv = pd.read_csv(tmp_path / "lb" / "cifar10-jpeg-Linf.csv")
    assert len(csv) == 3 and set(csv.classifier) == {"resnet18-pyautoattack"}
    assert set(csv.attack) == {"PGD-EOT(Linf, 1 steps, EOT 1)"}
    assert sorted(csv.evaluation) == ["single", "single", "worst:2"]  # one attack, a row per evaluation mode
    hetpure = csv[csv.defense == "hetpure"]
    assert (hetpure.wall_s > 0).all() and (hetpure.images_per_s > 0).all() and (csv.peak_mem_mib > 100).all()
    assert csv.device.str.startswith("cpu").all() and (csv.sanity == "ok").all()
    with ResultStore(tmp_path / "lb" / "results.sqlite") as store:
        rows = store.rows()
        assert len(rows) == 3
        per_image = store.per_image(rows[0]["setup_hash"], "single")
        assert all(len(row["clean_ci"]) == len(row["robust_ci"]) == 2 and row["interval_method"] == "Wilson 95%" for row in rows)
        assert per_image.columns.tolist() == ["index", "label", "clean_pred", "adv_pred", "clean_correct", "robust_correct"]
        assert len(per_image) == 2
    assert main(["run", "--defense", "none"] + common) == 0  # nothing left to compute
    assert "1 of 1 batches already in the store" in capsys.readouterr().out
    assert main(["report", "--name", "t", "--store", str(tmp_path / "lb" / "results.sqlite"), "--out", str(tmp_path / "rep")]) == 0
    report = (tmp_path / "rep" / "t" / "report.md").read_text()
    assert "| none | PGD-EOT(Linf, 1 steps, EOT 1) | full | single |" in report
    assert (tmp_path / "rep" / "t" / "cost.png").stat().st_size > 1000


def test_sweep_runs_one_row_per_point(tmp_path, monkeypatch, capsys):
    from conftest import write_image_tar

    preset = {"classifier": "resnet18-pyautoattack", "diffusion_model": "embedded-denoiser", "n_images": 2,
              "attacks": {"pgd-eot": {"steps": 1, "eot": 1}}, "batch_size": 2, "sanity": {"images": 0},
              "sweeps": {"t": {"defense": "diffpure", "n_images": 1, "points": [
                  {"t_star": 0.02, "sampler": "ddim", "ddim_stride": 20}, {"t_star": 0.04, "sampler": "ddim", "ddim_stride": 40}]}}}
    monkeypatch.setattr("hetpure_bench.bench.spec.load_preset", lambda name: json.loads(json.dumps(preset)))
    data = write_image_tar(tmp_path / "test.tar", 2, "test")
    args = ["--data", str(data), "--leaderboard-dir", str(tmp_path / "lb")]
    assert main(["sweep", "t"] + args) == 0
    csv = pd.read_csv(tmp_path / "lb" / "imagefolder-Linf.csv")
    assert sorted(csv.defense_config.str.extract(r"t_star=([0-9.]+)")[0]) == ["0.02", "0.04"]
    assert (csv.n_images == 1).all() and (csv.sanity == "not run").all()
    assert main(["sweep", "nope"] + args) == 2
    assert "has no sweep 'nope' (it has: t)" in capsys.readouterr().err


def test_no_checkpointing_changes_no_result(tmp_path, monkeypatch):
    from conftest import write_image_tar

    import hetpure_bench.bench.runner as runner
    from hetpure_bench.diffusion import sampling

    preset = {"classifier": "resnet18-pyautoattack", "diffusion_model": "embedded-denoiser", "n_images": 2,
              "attacks": {"pgd-eot": {"steps": 1, "eot": 2}}, "batch_size": 2, "sanity": {"images": 0},
              "defenses": {"hetpure": {"stride": 100}}}
    monkeypatch.setattr("hetpure_bench.bench.spec.load_preset", lambda name: json.loads(json.dumps(preset)))
    checkpointing, real_run = [], runner.run
    monkeypatch.setattr(runner, "run", lambda *a, **k: checkpointing.append(sampling._CHECKPOINTING.get()) or real_run(*a, **k))
    data = write_image_tar(tmp_path / "test.tar", 2, "test")
    records = []
    for name, flags in (("a", []), ("b", ["--no-checkpointing"])):
        assert main(["run", "--defense", "hetpure", "--data", str(data), "--leaderboard-dir", str(tmp_path / name)] + flags) == 0
        with ResultStore(tmp_path / name / "results.sqlite") as store:
            (key,) = {row["setup_hash"] for row in store.rows()}
            records.append(store.per_image(key, "single"))
    assert checkpointing == [True, False]
    pd.testing.assert_frame_equal(records[0], records[1])


def test_eval_seed_rejudges_the_stored_examples_of_a_run(tmp_path, capsys):
    from conftest import write_image_tar

    data = write_image_tar(tmp_path / "test.tar", 2, "test")
    common = ["run", "--defense", "none", "--data", str(data), "-n", "2", "--steps", "1", "--eot", "1",
              "--batch-size", "2", "--sanity-images", "0", "--leaderboard-dir", str(tmp_path / "lb")]
    assert main(common) == 0
    assert main(common + ["--eval-seed", "5", "--evaluation", "single,expected:2"]) == 0
    assert "none: judging 1 of 1 batches from stored adversarial examples" in capsys.readouterr().out
    with ResultStore(tmp_path / "lb" / "results.sqlite") as store:
        first, *rejudged = store.rows()
        single, expected = sorted(rejudged, key=lambda row: row["evaluation"] != "single")
        assert (first["eval_seed"], single["eval_seed"]) == (0, 5) and single["attack_reused"] and not first["attack_reused"]
        assert expected["evaluation"] == "expected:2" and expected["robust_acc"] == single["robust_acc"]  # deterministic
        pd.testing.assert_frame_equal(store.per_image(first["setup_hash"], "single"), store.per_image(single["setup_hash"], "single"))


def test_report_without_a_store_is_one_line(tmp_path, capsys):
    assert main(["report", "--store", str(tmp_path / "none.sqlite")]) == 2
    assert "no result store at" in capsys.readouterr().err


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
        (["run", "--defense", "hetpure", "--eval-seed", "-1"], "eval seed must be an integer >= 0"),
        (["run", "--defense", "hetpure", "--evaluation", "expected:0"], "unknown evaluation mode"),
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


def _existing_results(folder):
    """A leaderboard folder with one finished row in its store, as an earlier run leaves it."""
    from test_leaderboard import _row

    from hetpure_bench.reporting.leaderboard import write_leaderboards

    with ResultStore(folder / "results.sqlite") as store:
        store.save_rows("earlier", {"single": _row()})
        write_leaderboards(store, folder)
    return {p.name: p.read_bytes() for p in folder.iterdir()}


def test_every_bad_input_is_one_line_exit_2_and_leaves_earlier_results_alone(tmp_path, capsys):
    from conftest import write_image_tar

    from hetpure_bench.models.classifiers import robustbench_file

    lb = tmp_path / "lb"
    lb.mkdir()
    before = _existing_results(lb)
    data = write_image_tar(tmp_path / "test.tar", 4, "test")
    garbage = tmp_path / "garbage.tar"
    garbage.write_bytes(b"\x00not a tar" * 50)
    checkpoint = robustbench_file("Standard", "Linf")
    checkpoint.parent.mkdir(parents=True, exist_ok=True)
    checkpoint.write_bytes(b"PK\x03\x04 truncated torch zip")
    blocker = tmp_path / "a-file"
    blocker.write_text("x")
    not_a_store = tmp_path / "not-a-store.sqlite"
    not_a_store.write_bytes(b"garbage" * 100)
    run = ["run", "--defense", "hetpure", "-n", "2", "--leaderboard-dir", str(lb)]
    cases = [
        (["--defense", "hetpur"], "did you mean 'hetpure'"),
        (["--classifier", "resnet-18"], "unknown classifier"),
        (["--diffusion-model", "ddpm"], "unknown diffusion model"),
        (["--eps=-1/255"], "out of range for Linf"),
        (["--threat", "L2", "--eps", "100"], "out of range for L2"),
        (["--data", str(tmp_path / "missing")], "does not exist"),
        (["--data", str(garbage)], "cannot read image tar"),
        (["--data", str(data), "--classifier", "wrn-28-10-standard"], "corrupt or truncated"),
        (["--data", str(data), "--store", str(blocker / "results.sqlite")], "cannot write"),
        (["--data", str(data), "--store", str(not_a_store)], "cannot open the result store"),
        (["--data", str(data), "-n", "0"], "must be >= 1"),
        (["--data", str(data), "-n", "5"], "cannot draw 5 images"),
    ]
    for extra, message in cases:
        assert main(run + extra) == 2, extra
        err = capsys.readouterr().err
        assert message in err and err.count("\n") == 1, (extra, err)
        assert {p.name: p.read_bytes() for p in lb.iterdir()} == before, extra
    assert not_a_store.read_bytes() == b"garbage" * 100


def test_a_usage_error_is_one_line_too(capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(["run", "--threat", "L3"])
    err = capsys.readouterr().err
    assert exit_info.value.code == 2 and err.count("\n") == 1 and "invalid choice: 'L3'" in err
