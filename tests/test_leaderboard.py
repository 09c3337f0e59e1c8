import json
import math

import pandas as pd
import pytest

from hetpure_bench.bench.statistics import bootstrap_interval
from hetpure_bench.bench.store import ResultStore
from hetpure_bench.reporting.leaderboard import (
    COLUMNS,
    HEADLINE_COLUMNS,
    HEADLINE_NOTE,
    headline,
    write_leaderboards,
)


def _row(**changes):
    row = {
        "defense": "hetpure", "defense_config": "t_l=200", "classifier": "c", "diffusion_model": "d",
        "data_source": "cifar10-jpeg", "threat": "Linf", "eps": "0.0313725", "attack": "PGD-EOT",
        "gradient_mode": "full", "evaluation": "single", "n_images": 32, "seed": 0,
        "clean_acc": 0.8, "robust_acc": 0.5, "robust_by_attack": "-", "sanity": "ok",
        "nfe": 10, "wall_s": 12.0, "images_per_s": 2.6667, "peak_mem_mib": 900, "device": "cpu (2 threads)",
        "preset": "smoke", "setup_hash": "h" + str(sorted(changes.items())),
    }
    row.update(changes)
    return row


def store_with(path, rows, records=None, images=None):
    """A result store holding ``rows`` (oldest first), each under its own setup; ``records[i]``
    (per-image records) and ``images[i]`` (its image_indices_sha256) where given."""
    store = ResultStore(path)
    for i, row in enumerate(rows):
        key = f"{i:03d}"  # keys sort like the rows, so rows() returns them oldest first
        store.register(key, {"image_indices_sha256": (images or {}).get(i, "same-images")})
        if records and i in records:
            store.commit_batch(key, 0, {row["evaluation"]: records[i]}, {})
        store.save_rows(key, {row["evaluation"]: row})
    return store


def _records(clean, robust, indices=None):
    indices = indices or list(range(10, 10 + len(clean)))
    return [{"index": i, "label": 0, "clean_pred": 0, "adv_pred": 0, "clean_correct": c, "robust_correct": r}
            for i, c, r in zip(indices, clean, robust)]


def _wilson(k, n, z=1.959963984540054):
    """The Wilson score interval written out (independent of scipy)."""
    p = k / n
    centre, half = p + z * z / (2 * n), z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n))
    return (centre - half) / (1 + z * z / n), (centre + half) / (1 + z * z / n)


def test_one_row_per_setup_the_newest_wins_grouped_by_defense(tmp_path):
    rows = [_row(), _row(defense="none", robust_acc=0.0, nfe=0), _row(robust_acc=0.6, wall_s=11.0)]  # oldest first
    with store_with(tmp_path / "s.sqlite", rows) as store:
        written = write_leaderboards(store, tmp_path)
        assert written == [tmp_path / "cifar10-jpeg-Linf.csv"]
        csv = pd.read_csv(written[0])
        assert list(csv.columns) == COLUMNS
        assert csv.defense.tolist() == ["hetpure", "none"]
        assert csv.loc[csv.defense == "hetpure", "robust_acc"].tolist() == [0.6]  # the rerun's numbers
        markdown = (tmp_path / "cifar10-jpeg-Linf.md").read_text()
        assert ("| hetpure | t_l=200 | c | d | cifar10-jpeg | Linf | 0.0313725 | PGD-EOT | full | single | 32 | 0 | 0 | "
                "80.0 [-] | 60.0 [-] | - | - | - | - | ok | n/a | 10 | 11.0 | - | 2.67 | 900 | cpu (2 threads) |") in markdown  # no history: n/a; no DiffHammer, no seconds per attack: -
        store.save_rows("999", {"single": _row(seed=1)})  # another seed is another setup
        write_leaderboards(store, tmp_path)
    assert len(pd.read_csv(written[0])) == 3


def test_each_data_source_and_threat_model_gets_its_own_files(tmp_path):
    rows = [_row(), _row(threat="L2", eps="0.5"), _row(data_source="cifar10-official")]
    with store_with(tmp_path / "s.sqlite", rows) as store:
        names = sorted(p.name for p in write_leaderboards(store, tmp_path))
    assert names == ["cifar10-jpeg-L2.csv", "cifar10-jpeg-Linf.csv", "cifar10-official-Linf.csv"]
    assert all(len(pd.read_csv(tmp_path / n)) == 1 for n in names)
    assert all((tmp_path / n.replace(".csv", ".headline.csv")).exists() for n in names)


def test_interval_columns_cells_and_footnote_come_from_the_rows(tmp_path):
    rows = [_row(clean_ci=[0.6121, 0.9101], robust_ci=[0.3333, 0.6667], interval_method="Wilson 95%"),
            _row(defense="none", robust_acc=0.0)]  # stored before rows carried intervals
    with store_with(tmp_path / "s.sqlite", rows) as store:
        write_leaderboards(store, tmp_path)
    csv = pd.read_csv(tmp_path / "cifar10-jpeg-Linf.csv").set_index("defense")
    interval = ["clean_ci_low", "clean_ci_high", "robust_ci_low", "robust_ci_high"]
    assert csv.loc["hetpure", interval].tolist() == [0.6121, 0.9101, 0.3333, 0.6667]
    assert csv.loc["hetpure", "interval_method"] == "Wilson 95%"
    assert csv.loc["none", interval].isna().all() and pd.isna(csv.loc["none", "interval_method"])
    markdown = (tmp_path / "cifar10-jpeg-Linf.md").read_text()
    assert "| 80.0 [61.2, 91.0] | 50.0 [33.3, 66.7] | Wilson 95% | - | - | - | ok |" in markdown
    assert "| 80.0 [-] | 0.0 [-] | - | - | - | - | ok |" in markdown
    footnotes = [e["footnote"] for e in json.loads((tmp_path / "cifar10-jpeg-Linf.robustbench.json").read_text())]
    assert "intervals over 32 images (Wilson 95%): clean [61.2, 91.0]%, robust [33.3, 66.7]%" in footnotes[0]
    assert "intervals -" in footnotes[1]


def test_all_rows_are_grouped_by_defense_strongest_attack_first(tmp_path):
    rows = [_row(defense="none", robust_acc=0.0), _row(attack="A", robust_acc=0.7), _row(attack="B", robust_acc=0.2),
            _row(defense="diffpure", attack="A", robust_acc=0.9), _row(defense="diffpure", attack="B", robust_acc=0.4),
            _row(attack="C", robust_acc=0.5)]
    with store_with(tmp_path / "s.sqlite", rows) as store:
        write_leaderboards(store, tmp_path)
    csv = pd.read_csv(tmp_path / "cifar10-jpeg-Linf.csv")
    assert list(zip(csv.defense, csv.attack)) == [("diffpure", "B"), ("diffpure", "A"), ("hetpure", "B"),
                                                 ("hetpure", "C"), ("hetpure", "A"), ("none", "PGD-EOT")]
    markdown = (tmp_path / "cifar10-jpeg-Linf.md").read_text()
    sections = ["## Headline", "## All rows, grouped by defense", "### diffpure", "### hetpure", "### none"]
    assert sorted(sections, key=markdown.index) == sections


def test_headline_is_the_per_image_worst_case_over_attacks_on_the_same_images(tmp_path):
    clean = [True] * 5 + [False, True, True]
    pgd = [True, True, True, True, False, False, True, False]  # 5/8
    aa = [True, True, False, True, True, False, True, False]  # 5/8; per-image AND with pgd: 4/8
    rows = [_row(attack="PGD", clean_acc=7 / 8, robust_acc=5 / 8, n_images=8),
            _row(attack="AA", clean_acc=7 / 8, robust_acc=5 / 8, n_images=8, sanity="FAILED: gradients (0/8 non-zero)"),
            _row(attack="PGD", gradient_mode="bpda", clean_acc=7 / 8, robust_acc=6 / 8, n_images=8),  # other images
            _row(defense="none", clean_acc=7 / 8, robust_acc=0.0, n_images=8)]
    records = {0: _records(clean, pgd), 1: _records(clean, aa)[::-1],  # another order: matched by image index
               2: _records(clean, [True] * 6 + [False] * 2), 3: _records(clean, [False] * 8)}
    with store_with(tmp_path / "s.sqlite", rows, records, images={2: "other-images"}) as store:
        write_leaderboards(store, tmp_path)
    top = pd.read_csv(tmp_path / "cifar10-jpeg-Linf.headline.csv")
    assert list(top.columns) == HEADLINE_COLUMNS
    assert list(zip(top.defense, top.attacks)) == [  # best first; the row on other images is not combined
        ("hetpure", "PGD (bpda)"), ("hetpure", "AA (full); PGD (full)"), ("none", "PGD-EOT (full)")]
    combined = top.iloc[1]
    assert combined.robust_acc == 0.5 and combined.n_rows == 2 and combined.clean_acc == 7 / 8
    assert (combined.robust_ci_low, combined.robust_ci_high) == pytest.approx(_wilson(4, 8), abs=1e-9)
    assert (combined.clean_ci_low, combined.clean_ci_high) == pytest.approx(_wilson(7, 8), abs=1e-9)
    assert combined.interval_method == "Wilson 95%" and combined.notes == "-"
    assert combined.sanity == "AA (full): FAILED: gradients (0/8 non-zero)"  # included, but marked
    alone = top.iloc[0]
    assert alone.robust_acc == 0.75 and alone.n_rows == 1 and alone.sanity == "ok"
    markdown = (tmp_path / "cifar10-jpeg-Linf.md").read_text()
    assert "| 87.5 [52.9, 97.8] | 50.0 [21.5, 78.5] | Wilson 95% | 2 | AA (full); PGD (full) |" in markdown
    assert markdown.index("## Headline") < markdown.index("| 87.5 [52.9, 97.8] | 50.0 [21.5, 78.5]") < markdown.index("## All rows")


def test_headline_of_expected_rows_takes_the_per_image_minimum_fraction(tmp_path):
    rows = [_row(attack="PGD", evaluation="expected:4", n_images=4), _row(attack="AA", evaluation="expected:4", n_images=4),
            _row(attack="APGD", evaluation="expected:4", n_images=4)]  # no per-image records: named, not combined
    records = {0: _records([1, 1, 0.5, 0.25], [1, 0.5, 0.25, 0]), 1: _records([1, 0.75, 0.5, 0.25], [0.75, 0.75, 0, 0])}
    with store_with(tmp_path / "s.sqlite", rows, records) as store:
        top, again = headline(store.rows(), store), headline(store.rows(), store)
    pd.testing.assert_frame_equal(top, again)  # the seeded bootstrap: the same interval every time
    assert len(top) == 1 and top.n_rows[0] == 2
    assert top.robust_acc[0] == pytest.approx((0.75 + 0.5 + 0 + 0) / 4)
    assert top.clean_acc[0] == pytest.approx((1 + 0.75 + 0.5 + 0.25) / 4)
    assert top.interval_method[0] == "bootstrap 95% over images (seed 0)"
    low, high = bootstrap_interval([0.75, 0.5, 0, 0])
    assert (top.robust_ci_low[0], top.robust_ci_high[0]) == (low, high) and 0 <= low < top.robust_acc[0] < high <= 0.75
    assert top.notes[0] == ("clean outcomes differ between the rows: per-image minimum; "
                            "not combined (no per-image records in the store): APGD (full)")
    assert "upper bound of the true worst case" in HEADLINE_NOTE
