"""Convergence evidence in every row: histories stored with their batch, summed over batches,
judged (`converged`), warned about, shown in the leaderboard and the report's figure."""

from dataclasses import dataclass, field

import pandas as pd
import pytest
import torch
from test_leaderboard import _records, _row, store_with
from test_report import _png_size
from test_runner import _spec, _tiny_runs

from hetpure_bench.attacks import ATTACKS
from hetpure_bench.attacks.base import Attack
from hetpure_bench.attacks.convergence import AttackHistory, combined_counts
from hetpure_bench.bench.store import ResultStore
from hetpure_bench.bench.stored_histories import decode, encode, robust_counts
from hetpure_bench.registry import Entry


def _history(counts: list[int], images: int = 3) -> torch.Tensor:
    """(records, images) booleans with counts[r] surviving images in record r (the first ones)."""
    return torch.arange(images).unsqueeze(0) < torch.tensor(counts).unsqueeze(1)


@dataclass(frozen=True)
class ScriptedAttack(Attack):
    """Leaves the images as they are and reports, call by call, the next scripted history."""

    script: tuple = ()
    calls: list = field(default_factory=list, compare=False)
    norm: str = "Linf"
    eps: float = 0.03
    steps: int = 3
    seed: int = 0

    @property
    def name(self) -> str:
        return "Scripted"

    def perturb_with_history(self, model, x, y, progress=False):
        robust = self.script[len(self.calls)]
        self.calls.append(len(x))
        if robust is None:  # an attack that records no history
            return x.clone(), None
        zeros = torch.zeros(robust.shape)
        return x.clone(), AttackHistory(robust=robust, best_loss=zeros, step_size=zeros)


def _scripted(monkeypatch, *batches: torch.Tensor) -> ScriptedAttack:
    attack = ScriptedAttack(script=batches)
    monkeypatch.setitem(ATTACKS._entries, "scripted", Entry("scripted", lambda **settings: [attack]))
    return attack


# Two batches of 3 images, 4 records each; the row's counts are their sums, judged over records 2..3.
CONVERGING = (_history([3, 2, 2, 2]), _history([3, 3, 1, 1]))  # 6, 5, 3, 3: flat
STILL_FALLING = (_history([3, 2, 2, 2]), _history([3, 3, 1, 0]))  # 6, 5, 3, 2: moved by one image
LATE_DROP = (_history([3, 2, 2, 1]), _history([3, 3, 1, 0]))  # 6, 5, 3, 1: moved by two


def test_stored_histories_round_trip_every_field():
    history = AttackHistory(robust=_history([2, 2, 1, 0]), best_loss=torch.randn(4, 3, dtype=torch.float64),
                            step_size=torch.full((4, 3), 0.25))
    fields = decode(encode(history))
    assert sorted(fields) == ["best_loss", "robust", "step_size"]
    assert fields["robust"].dtype == bool and (fields["robust"] == history.robust.numpy()).all()
    assert torch.equal(torch.from_numpy(fields["best_loss"]), history.best_loss.float())
    assert robust_counts(encode(history)) == history.robust_counts() == [2, 2, 1, 0]


def test_stored_histories_keep_the_fields_an_attack_adds_numbers_included():
    """DiffHammer's history adds per-record tensors (avg, wor) and one number (replay_deviation)."""
    from hetpure_bench.attacks.diffhammer import DiffHammerHistory

    robust = _history([3, 2, 1])
    avg = torch.tensor([[0.0, 0.25, 0.5], [0.5, 0.25, 0.75], [0.5, 1.0, 0.75]])
    history = DiffHammerHistory(robust=robust, best_loss=torch.zeros(3, 3), step_size=torch.ones(3, 3), avg=avg,
                                wor=avg > 0, replay_deviation=2.5e-7)
    fields = decode(encode(history))
    assert sorted(fields) == ["avg", "best_loss", "replay_deviation", "robust", "step_size", "wor"]
    assert (fields["avg"] == avg.numpy()).all() and fields["wor"].dtype == bool and (fields["wor"] == (avg > 0).numpy()).all()
    assert fields["replay_deviation"].shape == () and float(fields["replay_deviation"]) == pytest.approx(2.5e-7)
    assert robust_counts(encode(history)) == [3, 2, 1]


def test_counts_are_summed_record_by_record_and_a_shorter_history_keeps_its_last_count():
    assert combined_counts([[3, 2, 2, 2], [3, 3, 1, 1]]) == [6, 5, 3, 3]
    assert combined_counts([[3, 2, 2, 2], [3, 1]]) == [6, 3, 3, 3]
    with pytest.raises(ValueError):
        combined_counts([[3], []])


def test_histories_are_stored_with_their_batch_and_summed_over_batches(tmp_path, monkeypatch):
    from hetpure_bench.bench.runner import attack_key, run

    _tiny_runs(monkeypatch)
    attack = _scripted(monkeypatch, *CONVERGING)
    with ResultStore(tmp_path / "r.sqlite") as store:
        rows = run(_spec("none", attack={"name": "scripted"}), store, progress=False)
        assert attack.calls == [3, 3]  # two batches of three images
        key = rows[0]["setup_hash"]
        stored = store.histories(attack_key(store.setup(key)))
        assert sorted(stored) == [0, 3] and all(sorted(batch) == [0] for batch in stored.values())
        for start, expected in zip((0, 3), CONVERGING):
            assert (decode(stored[start][0])["robust"] == expected.numpy()).all()
        assert store.db.execute("SELECT DISTINCT setup_hash FROM histories").fetchall() == [(key,)]
        for row in rows:  # every evaluation mode's row: the same attack, the same evidence
            assert row["convergence"] == [{"attack": "Scripted", "robust_counts": [6, 5, 3, 3], "converged": True}]
            assert row["converged"] == "yes"
        # Judged again from the stored examples (no attack): the history of the attack that made them.
        again = run(_spec("none", attack={"name": "scripted"}, evaluation="worst:2"), store, progress=False)
        assert attack.calls == [3, 3]
        assert again[0]["convergence"] == rows[0]["convergence"] and again[0]["attack_reused"]


def test_a_shards_batches_carry_their_histories_into_the_main_store(tmp_path):
    """What runner._merge_shards does: commit every batch a shard sends, histories included."""
    records = [{"single": [{"index": i, "robust_correct": True}]} for i in range(3)]
    with ResultStore(tmp_path / "shard.sqlite") as shard, ResultStore(tmp_path / "main.sqlite") as main:
        shard.commit_batch("k", 0, records[0], {"attack_s": 1.0}, "attack", [b"pgd", b"apgd"], {1: b"apgd-history"})
        shard.commit_batch("k", 1, records[1], {"attack_s": 1.0, "attack_reused_from": "j"}, "attack", [], {})
        for batch in shard.batches("k"):
            main.commit_batch("k", *batch)
        assert main.histories("attack") == {0: {1: b"apgd-history"}} == shard.histories("attack")
        assert main.db.execute("SELECT setup_hash FROM histories").fetchall() == [("k",)]
        with pytest.raises(ValueError, match="need their attack key"):
            main.commit_batch("k", 2, records[2], {}, None, [], {0: b"history"})
        shard.forget("k")
        assert shard.histories("attack") == {}


@pytest.mark.parametrize("script, verdict", [(CONVERGING, "yes"), (STILL_FALLING, "yes"), (LATE_DROP, "no")])
def test_converged_through_a_real_run_and_the_warning_run_prints(tmp_path, monkeypatch, capsys, script, verdict):
    from hetpure_bench.bench.runner import run
    from hetpure_bench.cli import _report

    _tiny_runs(monkeypatch)
    _scripted(monkeypatch, *script)
    with ResultStore(tmp_path / "r.sqlite") as store:
        row = run(_spec("none", attack={"name": "scripted"}, evaluation="single"), store, progress=False)[0]
    assert row["converged"] == verdict
    _report(row, tmp_path, tmp_path / "r.sqlite")
    err = capsys.readouterr().err
    if verdict == "no":
        assert ("WARNING: none: not converged (Scripted's robust count moved by 2 images over the last 25% of "
                "its 4 passes; at most 1 expected)") in err
    else:
        assert "not converged" not in err


def test_pgd_eot_rows_carry_the_check_of_every_iterate_the_returned_one_last(tmp_path, monkeypatch):
    from hetpure_bench.bench.runner import run

    attacks = _tiny_runs(monkeypatch)
    with ResultStore(tmp_path / "r.sqlite") as store:
        pgd = run(_spec("none"), store, progress=False)[0]
    assert len(attacks) == 2 and pgd["evaluation"] == "single"
    (entry,) = pgd["convergence"]
    # 1 step: the clean images (all classified right), then the returned examples; the defense
    # and the classifier are deterministic, so the attack's check of them is the evaluation's.
    assert entry["attack"] == attacks[0].name and entry["robust_counts"] == [6, round(6 * pgd["robust_acc"])]
    assert pgd["robust_acc"] < 1 and pgd["converged"] == ("yes" if entry["converged"] else "no")


def test_rows_without_history_say_n_a(tmp_path, monkeypatch):
    from hetpure_bench.bench.runner import run

    _tiny_runs(monkeypatch)
    with ResultStore(tmp_path / "r.sqlite") as store:
        _scripted(monkeypatch, None, None)  # an attack that records no history
        silent = run(_spec("none", attack={"name": "scripted"}, evaluation="single"), store, progress=False)[0]
        assert (silent["converged"], silent["convergence"]) == ("n/a", [])
        _scripted(monkeypatch, *CONVERGING)
        scripted = run(_spec("none", attack={"name": "scripted", "steps": 4}, evaluation="single"), store, progress=False)[0]
        assert scripted["converged"] == "yes"
        # Batches stored before histories were (one of them, then both): the rows say n/a.
        for start in (3, 0):
            store.db.execute("DELETE FROM histories WHERE batch_start = ?", (start,))
            again = run(_spec("none", attack={"name": "scripted", "steps": 4}, evaluation="single"), store, progress=False)[0]
            assert again["converged"] == "n/a"


def test_the_leaderboard_has_a_converged_column_after_sanity(tmp_path):
    from hetpure_bench.reporting.leaderboard import COLUMNS, HEADLINE_COLUMNS, write_leaderboards

    assert COLUMNS[COLUMNS.index("sanity") + 1] == "converged"
    assert HEADLINE_COLUMNS[HEADLINE_COLUMNS.index("sanity") + 1] == "converged"
    old = _row(attack="PGD-EOT", robust_acc=0.5)  # as stored before rows carried `converged`
    rows = [old, _row(attack="APGD-EOT", robust_acc=0.25, converged="no"), _row(defense="none", converged="yes")]
    records = {i: _records([True] * 4, [True, False, True, False]) for i in range(3)}
    with store_with(tmp_path / "s.sqlite", rows, records) as store:
        path = write_leaderboards(store, tmp_path)[0]
    table = pd.read_csv(path, keep_default_na=False)  # pandas would read "n/a" as missing
    assert table[["defense", "attack", "converged"]].values.tolist() == [
        ["hetpure", "APGD-EOT", "no"], ["hetpure", "PGD-EOT", "n/a"], ["none", "PGD-EOT", "yes"]]
    top = pd.read_csv(path.with_suffix(".headline.csv"), keep_default_na=False).set_index("defense")["converged"]
    # hetpure combines a row that did not converge and one without history; none's only row converged.
    assert top["hetpure"] == "APGD-EOT (full): no; PGD-EOT (full): n/a" and top["none"] == "yes"
    markdown = path.with_suffix(".md").read_text()
    assert "| - | - | ok | no | 10 |" in markdown and "| - | - | ok | n/a | 10 |" in markdown


def _convergence_rows():
    falling = {"attack": "APGD-EOT(Linf, margin, 10 iter, EOT 2, 1 restart)", "robust_counts": [30, 22, 16, 12, 9, 7, 5, 4, 3, 2, 1], "converged": False}
    flat = {"attack": "APGD-EOT(Linf, ce, 10 iter, EOT 2, 1 restart)", "robust_counts": [30, 20, 14, 12, 11, 11, 10, 10, 10, 10, 10], "converged": True}
    return [
        _row(attack="suite(...)", convergence=[falling, flat], converged="no", setup_hash="a"),
        _row(attack="suite(...)", evaluation="worst:5", convergence=[falling, flat], converged="no", setup_hash="a"),
        _row(defense="diffpure", attack="APGD-EOT", convergence=[{**flat, "robust_counts": [32, 25, 20, 19, 19]}],
             converged="yes", setup_hash="b"),
        _row(defense="none", attack="PGD-EOT", setup_hash="c"),  # no history
    ]


def test_the_convergence_figure_has_one_line_per_attack_history(tmp_path):
    from hetpure_bench.reporting.plots import convergence_lines, convergence_plot

    lines = convergence_lines(_convergence_rows())
    assert [(label.split(":")[0], done) for label, _, done in lines] == [
        ("hetpure [full]", False), ("hetpure [full]", True), ("diffpure [full]", True)]  # the worst:5 row shares setup a
    assert lines[0][1][0] == 100 * 30 / 32 and lines[2][1] == [100.0, 100 * 25 / 32, 62.5, 100 * 19 / 32, 100 * 19 / 32]
    assert "NOT converged" in lines[0][0]
    assert _png_size(convergence_plot(_convergence_rows(), tmp_path / "convergence.png")) == (1000, 600)
    assert _png_size(convergence_plot([], tmp_path / "empty.png")) == (1000, 600)


def test_the_report_draws_the_figure_and_names_the_rows_not_converged(tmp_path):
    from hetpure_bench.reporting.report import write_report

    path = write_report(_convergence_rows(), "r", tmp_path, "store.sqlite", [])
    text = path.read_text()
    assert (path.parent / "convergence.png").is_file() and "(convergence.png)" in text
    # One entry per setup (its modes together), with the gradient mode that tells setups apart.
    assert "1 setup not converged (more iterations may lower its robust accuracy): hetpure (suite(...), gradient full: " \
           "single, worst:5). 1 row recorded no history" in text
