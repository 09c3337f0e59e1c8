import os
import subprocess
import sys

import pytest
import torch
from conftest import write_image_tar

from hetpure_bench import threads
from hetpure_bench.cli import main
from hetpure_bench.errors import UserError
from hetpure_bench.threads import intra_op_threads

TORCHRUN = {"TORCHELASTIC_RUN_ID": "none", "LOCAL_WORLD_SIZE": "2"}  # what torchrun puts in a worker's env


@pytest.mark.parametrize("cores, local_ranks, expected", [(2, 2, 1), (4, 3, 1), (16, 2, 8), (16, 3, 5), (1, 1, 1),
                                                          (1, 4, 1), (2, 1, 2), (8, 1, 8)])
def test_the_cores_are_shared_by_the_local_processes(cores, local_ranks, expected):
    n, reason = intra_op_threads(cores, local_ranks, None, {})
    assert n == expected and reason == f"{cores} cores / {local_ranks} local processes"


def test_the_users_environment_wins_over_the_cores():
    assert intra_op_threads(16, 2, None, {"OMP_NUM_THREADS": "3"}) == (3, "OMP_NUM_THREADS")
    assert intra_op_threads(2, 1, None, {"OMP_NUM_THREADS": "6"}) == (6, "OMP_NUM_THREADS")  # above the cores too
    assert intra_op_threads(16, 1, None, {"OMP_NUM_THREADS": "4,2"}) == (4, "OMP_NUM_THREADS")  # nested: outer level
    # torch's own order: MKL_NUM_THREADS over OMP_NUM_THREADS
    assert intra_op_threads(16, 1, None, {"OMP_NUM_THREADS": "3", "MKL_NUM_THREADS": "5"}) == (5, "MKL_NUM_THREADS")
    assert intra_op_threads(16, 1, None, {"OMP_NUM_THREADS": " ", "MKL_NUM_THREADS": ""})[0] == 16  # empty: unset


def test_threads_option_wins_over_everything():
    env = {"OMP_NUM_THREADS": "3", "MKL_NUM_THREADS": "5", **TORCHRUN}
    assert intra_op_threads(16, 2, 7, env) == (7, "--threads")
    assert intra_op_threads(1, 4, 2, {}) == (2, "--threads")


def test_torchruns_own_default_is_not_taken_for_the_users():
    # torchrun puts OMP_NUM_THREADS=1 in every worker when it starts several and the user set none.
    assert intra_op_threads(16, 2, None, {"OMP_NUM_THREADS": "1", **TORCHRUN})[0] == 8
    assert intra_op_threads(2, 2, None, {"OMP_NUM_THREADS": "1", **TORCHRUN})[0] == 1
    assert intra_op_threads(16, 2, None, {"OMP_NUM_THREADS": "4", **TORCHRUN}) == (4, "OMP_NUM_THREADS")
    assert intra_op_threads(16, 2, 1, {"OMP_NUM_THREADS": "1", **TORCHRUN}) == (1, "--threads")
    # One process per machine: torchrun sets nothing, so a 1 is the user's.
    one = {"TORCHELASTIC_RUN_ID": "none", "LOCAL_WORLD_SIZE": "1", "OMP_NUM_THREADS": "1"}
    assert intra_op_threads(16, 1, None, one) == (1, "OMP_NUM_THREADS")
    assert intra_op_threads(16, 1, None, {"OMP_NUM_THREADS": "1"}) == (1, "OMP_NUM_THREADS")  # no torchrun


@pytest.mark.parametrize("requested", [0, -2])
def test_fewer_than_one_thread_is_refused(requested):
    with pytest.raises(UserError, match=f"--threads must be >= 1, got {requested}"):
        intra_op_threads(2, 1, requested, {})


@pytest.mark.parametrize("value", ["0", "abc", "-1", "2.5"])
def test_a_bad_thread_variable_is_refused(value):
    with pytest.raises(UserError, match=f"OMP_NUM_THREADS must be a whole number >= 1, got '{value}'"):
        intra_op_threads(2, 1, None, {"OMP_NUM_THREADS": value})


def test_local_world_size_comes_from_torchrun():
    assert threads.local_world_size({}) == 1
    assert threads.local_world_size({"LOCAL_WORLD_SIZE": "4"}) == 4


def test_affinity_is_the_process_cpu_set():
    assert threads.affinity_cores() == len(os.sched_getaffinity(0))


def test_configure_sets_torchs_threads_and_a_spin_count_unless_the_user_set_one(monkeypatch):
    for name in ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "LOCAL_WORLD_SIZE", *threads.SPIN_SETTINGS):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setattr(threads, "affinity_cores", lambda: 3)
    assert threads.configure(None) == (3, "3 cores / 1 local processes")
    assert torch.get_num_threads() == 3 and os.environ["GOMP_SPINCOUNT"] == threads.GOMP_SPINCOUNT
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "2")
    monkeypatch.setenv("GOMP_SPINCOUNT", "12")
    assert threads.configure(None)[0] == 1 and torch.get_num_threads() == 1
    assert os.environ["GOMP_SPINCOUNT"] == "12"
    monkeypatch.delenv("GOMP_SPINCOUNT")
    monkeypatch.setenv("OMP_WAIT_POLICY", "ACTIVE")
    assert threads.configure(2)[0] == 2 and torch.get_num_threads() == 2
    assert "GOMP_SPINCOUNT" not in os.environ


def test_the_cli_imports_torch_only_after_the_spin_setting():
    # libgomp reads GOMP_SPINCOUNT when torch loads it: the CLI must not import torch before main().
    code = "import sys, hetpure_bench.cli; print('torch' in sys.modules)"
    assert subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout.strip() == "False"


@pytest.mark.parametrize("command", [["run", "--defense", "none"], ["sweep", "diffpure-t-star"], ["report"],
                                     ["train-denoiser", "--out", "x"], ["eval-denoiser"]])
def test_threads_below_one_is_a_one_line_error(command, capsys):
    assert main([*command, "--threads", "0"]) == 2
    err = capsys.readouterr().err
    assert err == "hetpure_bench: error: --threads must be >= 1, got 0\n"


def test_threads_option_sets_the_rows_device_label(tmp_path, capsys):
    write_image_tar(tmp_path / "test.tar", 2, "test")
    args = ["run", "--defense", "none", "--data", str(tmp_path / "test.tar"), "-n", "2", "--batch-size", "2",
            "--steps", "1", "--eot", "1", "--sanity-images", "0", "--leaderboard-dir", str(tmp_path / "lb")]
    assert main([*args, "--threads", "1"]) == 0
    assert "cpu (1 thread))" in capsys.readouterr().out
    assert torch.get_num_threads() == 1
