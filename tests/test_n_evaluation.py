"""DiffHammer's own N-evaluation as row fields: from the stored histories (last record of each
batch) to the row, the leaderboard, the run's summary and the report."""

import pandas as pd
import pytest
import torch
from test_leaderboard import _row, _wilson
from test_runner import _spec, _tiny_runs

from hetpure_bench.attacks.apgd import APGDEOT
from hetpure_bench.attacks.convergence import AttackHistory
from hetpure_bench.attacks.diffhammer import DiffHammer, DiffHammerHistory
from hetpure_bench.bench.n_evaluation import n_evaluation_fields
from hetpure_bench.bench.statistics import bootstrap_interval
from hetpure_bench.bench.store import ResultStore
from hetpure_bench.bench.stored_histories import encode


def _hammer_history(avg: list[list[float]], wor: list[list[bool]]) -> bytes:
    """A stored DiffHammerHistory with the given per record and image avg and wor."""
    avg, wor = torch.tensor(avg), torch.tensor(wor)
    zeros = torch.zeros(avg.shape)
    return encode(DiffHammerHistory(robust=avg < 0.5, best_loss=zeros, step_size=zeros, avg=avg, wor=wor, replay_deviation=0.0))


# Two batches (3 and 2 images), N = 4. Only the last record counts: it holds every image, also
# image 2 of the first batch, which the last restart left out (its values carried along).
FIRST = _hammer_history([[0.0, 0.5, 0.0], [0.25, 0.75, 0.0], [0.25, 1.0, 0.0]],
                        [[False, True, False], [True, True, False], [True, True, False]])
SECOND = _hammer_history([[0.0, 0.0], [0.5, 0.0]], [[False, False], [True, False]])
# per image avg 0.25, 1, 0, 0.5, 0 -> robust outcomes 0.75, 0, 1, 0.5, 1 (mean 0.65);
# wor True, True, False, True, False -> 2 of 5 never broken
HAMMER = DiffHammer(purifications=4, steps=2, losses="margin")


def test_avg_and_wor_with_their_intervals_by_hand():
    fields = n_evaluation_fields([{0: FIRST}, {0: SECOND}], [HAMMER])
    (entry,) = fields["diffhammer_n_evaluation"]
    assert (entry["attack"], entry["purifications"], entry["n_images"]) == (HAMMER.name, 4, 5)
    assert entry["avg"] == pytest.approx(0.65) and entry["wor"] == pytest.approx(0.4)
    # Avg's outcomes are fractions: the bootstrap over images; Wor's are 0/1: Wilson.
    assert entry["avg_ci"] == list(bootstrap_interval([0.75, 0.0, 1.0, 0.5, 1.0]))
    assert entry["avg_interval_method"] == "bootstrap 95% over images (seed 0)"
    assert entry["wor_ci"] == pytest.approx(list(_wilson(2, 5)), abs=1e-9) and entry["wor_interval_method"] == "Wilson 95%"
    low, high = entry["avg_ci"]
    assert low < 0.65 < high
    wilson_low, wilson_high = _wilson(2, 5)
    assert fields["diffhammer_avg"] == f"65.0 [{100 * low:.1f}, {100 * high:.1f}]"
    assert fields["diffhammer_wor"] == f"40.0 [{100 * wilson_low:.1f}, {100 * wilson_high:.1f}]"


def test_avg_outcomes_that_are_all_zero_or_one_get_wilson_and_float32_fractions_are_exact():
    hundred = [[0.1] * 3 + [0.0] * 7]  # 1 of 10 purifications wrong: 0.1 in float32 is not 1/10
    (entry,) = n_evaluation_fields([{0: _hammer_history(hundred, [[True] * 3 + [False] * 7])}],
                                   [DiffHammer(purifications=10)])["diffhammer_n_evaluation"]
    assert entry["avg"] == (3 * 0.9 + 7 * 1.0) / 10  # from exact multiples of 1/N
    binary = _hammer_history([[1.0, 0.0, 0.0, 1.0]], [[True, False, True, True]])
    (entry,) = n_evaluation_fields([{0: binary}], [HAMMER])["diffhammer_n_evaluation"]
    assert entry["avg"] == 0.5 and entry["avg_interval_method"] == "Wilson 95%"
    assert entry["avg_ci"] == pytest.approx(list(_wilson(2, 4)), abs=1e-9) and entry["wor"] == 0.25


def test_one_entry_per_diffhammer_member_with_a_history_in_every_batch():
    other = DiffHammer(purifications=4, steps=3, losses="ce")
    apgd = APGDEOT(steps=1, eot=1)
    zeros = torch.zeros(1, 3)
    apgd_history = encode(AttackHistory(robust=zeros.bool(), best_loss=zeros, step_size=zeros))
    only_first = _hammer_history([[0.0, 0.0, 0.0]], [[False, False, False]])
    histories = [{0: apgd_history, 1: FIRST, 2: only_first, 3: FIRST}, {0: apgd_history, 1: SECOND, 3: SECOND}]
    fields = n_evaluation_fields(histories, [apgd, HAMMER, other, other.replace(seed=1)])
    entries = fields["diffhammer_n_evaluation"]
    assert [e["attack"] for e in entries] == [HAMMER.name, other.name]  # APGD has none; member 2 lacks batch 2
    wilson_low, wilson_high = _wilson(2, 5)
    wor = f"40.0 [{100 * wilson_low:.1f}, {100 * wilson_high:.1f}]"
    assert fields["diffhammer_wor"] == f"{HAMMER.name} {wor}; {other.name} {wor}"  # several: each one named
    assert n_evaluation_fields([{0: apgd_history}], [apgd]) == {
        "diffhammer_n_evaluation": [], "diffhammer_avg": "-", "diffhammer_wor": "-"}
    assert n_evaluation_fields([], [HAMMER])["diffhammer_avg"] == "-"  # no batch stored with a history


EPS = 0.02  # breaks some of the six images, not all


def test_a_suite_row_with_diffhammer_shows_its_own_n_evaluation_everywhere(tmp_path, monkeypatch, capsys):
    """On the deterministic defense `none` every purification is the classifier's prediction, so
    an image survives DiffHammer's Avg and Wor exactly when the member's returned example is
    classified right: both equal the member's own robust accuracy in the runner's evaluation."""
    from hetpure_bench.bench.runner import run
    from hetpure_bench.cli import _report
    from hetpure_bench.reporting.leaderboard import write_leaderboards
    from hetpure_bench.reporting.report import write_report

    _tiny_runs(monkeypatch)
    members = [{"name": "pgd-eot"}, {"name": "diffhammer"}]
    sizes = {"pgd-eot": {"steps": 1, "eot": 1}, "diffhammer": {"steps": 2, "purifications": 2, "losses": "margin"}}
    attack = {"name": "suite", "members": members, **sizes}
    with ResultStore(tmp_path / "r.sqlite") as store:
        row = run(_spec("none", eps=EPS, evaluation="single", attack=attack), store, progress=False)[0]
        member = store.per_image(row["setup_hash"], "single")["robust_correct_1"]
        written = write_leaderboards(store, tmp_path / "lb")[0]
    (entry,) = row["diffhammer_n_evaluation"]
    assert entry["attack"].startswith("DiffHammer(") and entry["n_images"] == 6
    assert 0 < entry["avg"] == entry["wor"] == member.mean() < 1
    assert row["diffhammer_avg"] == row["diffhammer_wor"] != "-"
    table = pd.read_csv(written, keep_default_na=False)
    assert table["diffhammer_avg"].tolist() == [row["diffhammer_avg"]] and table["diffhammer_wor"].tolist() == [row["diffhammer_wor"]]
    assert f"| {row['diffhammer_avg']} | {row['diffhammer_wor']} | {row['sanity']} |" in written.with_suffix(".md").read_text()
    _report(row, tmp_path, tmp_path / "r.sqlite")
    out = capsys.readouterr().out
    assert (f"{entry['attack']}'s own N-evaluation (under the attack's noise, N = 2 purifications of every iterate "
            f"it evaluated; robust %): Avg {row['diffhammer_avg']} (Wilson 95%), Wor {row['diffhammer_wor']} "
            "(Wilson 95%); robust above is the returned example judged again under fresh evaluation noise") in out
    report = write_report([row], "r", tmp_path / "reports", "r.sqlite", []).read_text()
    assert f"| {row['diffhammer_avg']} | {row['diffhammer_wor']} |" in report


def test_rows_without_diffhammer_and_rows_stored_before_show_a_dash(tmp_path):
    from test_leaderboard import store_with

    from hetpure_bench.reporting.leaderboard import write_leaderboards

    with store_with(tmp_path / "s.sqlite", [_row(), _row(defense="none", diffhammer_avg="-", diffhammer_wor="-")]) as store:
        path = write_leaderboards(store, tmp_path)[0]
    table = pd.read_csv(path, keep_default_na=False)
    assert table[["diffhammer_avg", "diffhammer_wor"]].values.tolist() == [["-", "-"], ["-", "-"]]
