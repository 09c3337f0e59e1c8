"""Crash safety and sharding, end to end through ``python -m hetpure_bench run`` in subprocesses
(the real embedded models on a tiny generated image tar), on two cores of this process's CPU
affinity: a single process then computes with 2 threads and each of two torchrun ranks with 1."""

import json
import os
import shutil
import sqlite3
import subprocess
import sys
from contextlib import closing

import pandas as pd
import pytest
from conftest import HANG_GUARD_S, write_image_tar

from hetpure_bench.bench.store import ResultStore
from hetpure_bench.reporting.leaderboard import COST_COLUMNS

N_IMAGES = 6


def _command(data, out, *extra):
    return [
        "run", "--defense", "hetpure", "--defense-arg", "stride=100", "--data", str(data), "-n", str(N_IMAGES),
        "--batch-size", "1", "--steps", "1", "--eot", "1", "--evaluation", "single,worst:2",
        "--sanity-images", "0", "--leaderboard-dir", str(out), *extra,
    ]


CORES = sorted(os.sched_getaffinity(0))[:2]
# Kills its own process (SIGKILL: no cleanup, as a crash or the OOM killer) when the run is about
# to commit its second batch: the kill lands mid-run, after one committed batch, on any machine
# however loaded (a test that polled the store and killed from outside raced the run).
KILLED_BEFORE_SECOND_COMMIT = """
import os, signal, sys
from hetpure_bench.cli import main
from hetpure_bench.bench.store import ResultStore
commit, commits = ResultStore.commit_batch, []
def commit_or_die(self, *args):
    commits.append(args[1])
    if len(commits) == 2:
        os.kill(os.getpid(), signal.SIGKILL)
    commit(self, *args)
ResultStore.commit_batch = commit_or_die
sys.exit(main(sys.argv[1:]))
"""


def _env():
    # No thread settings of the caller's: the thread policy chooses (threads.py).
    return {k: v for k, v in os.environ.items() if k not in ("OMP_NUM_THREADS", "MKL_NUM_THREADS")}


def _on_two_cores():
    os.sched_setaffinity(0, CORES)


def _subprocess(command, **kwargs):
    return subprocess.run(command, capture_output=True, text=True, timeout=HANG_GUARD_S, env=_env(),
                          preexec_fn=_on_two_cores, **kwargs)


def _run(args):
    result = _subprocess([sys.executable, "-m", "hetpure_bench", *args])
    assert result.returncode == 0, result.stderr[-2000:]
    return result


def _committed_batches(store):
    with closing(sqlite3.connect(store)) as db:
        return db.execute("SELECT COUNT(*) FROM batches").fetchone()[0]


def _devices(store):
    """(rank, device label) of every committed batch."""
    with closing(sqlite3.connect(store)) as db:
        costs = [json.loads(c) for (c,) in db.execute("SELECT cost FROM batches")]
    return {(c["rank"], c["device"]) for c in costs}


def _samples(store):
    with closing(sqlite3.connect(store)) as db:
        return db.execute("SELECT mode, image_index, record FROM samples ORDER BY mode, image_index").fetchall()


def _examples(store):
    with closing(sqlite3.connect(store)) as db:
        return db.execute("SELECT attack_key, batch_start, attack_index, blob FROM examples ORDER BY batch_start, attack_index").fetchall()


def _results_only(leaderboard_dir):
    csv, = leaderboard_dir.glob("*-Linf.csv")  # one data source, one threat model (not the .headline.csv)
    return pd.read_csv(csv).drop(columns=COST_COLUMNS)


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory):
    folder = tmp_path_factory.mktemp("uninterrupted")
    data = write_image_tar(folder / "test.tar", 8, "test")
    _run(_command(data, folder / "lb"))
    return data, folder / "lb"


def test_a_run_killed_after_its_first_batch_resumes_to_the_same_leaderboard(tmp_path, uninterrupted):
    data, reference = uninterrupted
    out = tmp_path / "lb"
    store = out / "results.sqlite"
    # 1 thread (the reference took 2): a resumed run may use another thread count.
    killed = _subprocess([sys.executable, "-c", KILLED_BEFORE_SECOND_COMMIT, *_command(data, out, "--threads", "1")])
    assert killed.returncode == -9, killed.stderr[-2000:]
    assert _committed_batches(store) == 1  # the second batch was computed, then lost with the process

    result = _run(_command(data, out, "--threads", "1"))
    assert f"1 of {N_IMAGES} batches already in the store, computing the rest" in result.stdout
    assert _devices(store) == {(0, "cpu (1 thread)")}
    assert _committed_batches(store) == N_IMAGES
    samples = _samples(store)
    assert len(samples) == 2 * N_IMAGES == len({(m, i) for m, i, _ in samples})  # none lost, none twice
    assert samples == _samples(reference / "results.sqlite")
    assert len(_examples(store)) == N_IMAGES and _examples(store) == _examples(reference / "results.sqlite")
    resumed, expected = _results_only(out), _results_only(reference)
    assert len(resumed) == 2
    pd.testing.assert_frame_equal(resumed, expected)


def _torchrun():
    torchrun = shutil.which("torchrun", path=os.path.dirname(sys.executable)) or shutil.which("torchrun")
    if torchrun is None:
        pytest.skip("torchrun not found")
    return torchrun


def test_torchrun_with_two_processes_matches_the_single_process_run(tmp_path, uninterrupted):
    torchrun = _torchrun()
    if len(CORES) < 2:
        pytest.skip("needs 2 cores")
    data, reference = uninterrupted
    out = tmp_path / "lb"
    result = _subprocess(
        [torchrun, "--standalone", "--nproc_per_node=2", "-m", "hetpure_bench", *_command(data, out, "--device", "cpu")],
    )
    assert result.returncode == 0, result.stderr[-3000:]
    assert "[rank 1/2]" in result.stderr and "[rank 0/2]" in result.stderr  # both ranks computed batches
    # 2 cores shared by 2 ranks: 1 thread each, where the single process took both cores; the
    # per-image results do not depend on it.
    assert _devices(out / "results.sqlite") == {(0, "cpu (1 thread)"), (1, "cpu (1 thread)")}
    assert _devices(reference / "results.sqlite") == {(0, "cpu (2 threads)")}
    assert _samples(out / "results.sqlite") == _samples(reference / "results.sqlite")
    assert _examples(out / "results.sqlite") == _examples(reference / "results.sqlite")  # merged from the shards
    pd.testing.assert_frame_equal(_results_only(out), _results_only(reference))
    assert not list(out.glob("*.rank*"))  # the shard files are gone
    assert sorted(p.suffix for p in out.iterdir()) == [".csv", ".csv", ".json", ".md", ".sqlite"]  # leaderboard, headline, ...


@pytest.mark.slow
def test_torchrun_judges_stored_examples_on_every_rank(tmp_path, uninterrupted):
    data, reference = uninterrupted
    out = tmp_path / "lb"
    out.mkdir()
    shutil.copy(reference / "results.sqlite", out / "results.sqlite")
    # Other evaluation modes: both ranks judge the stored examples (rank 1 gets them from rank 0).
    result = subprocess.run(
        [_torchrun(), "--standalone", "--nproc_per_node=2", "-m", "hetpure_bench",
         *_command(data, out, "--device", "cpu", "--evaluation", "worst:2,expected:2")],
        capture_output=True, text=True, timeout=600, env=_env(),
    )
    assert result.returncode == 0, result.stderr[-3000:]
    assert f"judging {N_IMAGES} of {N_IMAGES} batches from stored adversarial examples" in result.stdout
    assert "[rank 1/2]" in result.stderr and "[rank 0/2]" in result.stderr
    assert _examples(out / "results.sqlite") == _examples(reference / "results.sqlite")  # none attacked again
    with ResultStore(out / "results.sqlite") as store, ResultStore(reference / "results.sqlite") as ref:
        (rejudged,) = [r["setup_hash"] for r in store.rows() if r["evaluation"] == "worst:2" and r["attack_reused"]]
        (original,) = [r["setup_hash"] for r in ref.rows() if r["evaluation"] == "worst:2"]
        pd.testing.assert_frame_equal(store.per_image(rejudged, "worst:2"), ref.per_image(original, "worst:2"))
