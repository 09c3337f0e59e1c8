import json
import struct

import numpy as np
import pytest
import torch
from test_leaderboard import _row, store_with
from tiny_models import tiny_models

from hetpure_bench.defenses import build_defense
from hetpure_bench.reporting.leaderboard import write_leaderboards
from hetpure_bench.reporting.plots import cost_plot, error_lengths, image_grid_plot, scatter_plot, strength_plot
from hetpure_bench.reporting.published import load_published
from hetpure_bench.reporting.report import write_report
from hetpure_bench.reporting.tables import side_by_side

PUBLISHED = load_published("""
- {method: hetpure, classifier: wrn-28-10-standard, threat: Linf, eps: 8/255, clean: 93.16, robust: 80.45,
   attack: AutoAttack, source: paper A, verified: true}
- {method: diffpure, classifier: wrn-28-10-standard, threat: Linf, eps: 8/255, clean: 89.02, robust: 70.64,
   attack: AutoAttack, source: paper B, verified: true}
- {method: Standard, kind: reference, classifier: wrn-28-10-standard, threat: Linf, eps: 8/255, clean: 94.78,
   robust: 0.0, attack: AutoAttack, source: RobustBench, verified: false}
""")


def _rows():
    """A small store's rows: two attacks on hetpure (the stronger must be picked, and has intervals;
    the others are rows stored before intervals were), a DiffPure t* sweep, a paper-setup row, a
    row that failed its sanity checks."""
    rows = [
        _row(attack="PGD-EOT", clean_acc=0.75, robust_acc=0.25, clean_ci=[0.6, 0.9], robust_ci=[0.12, 0.44],
             interval_method="Wilson 95%"),
        _row(attack="AutoAttack-rand", clean_acc=0.75, robust_acc=0.5),
        _row(attack="PGD-EOT", evaluation="worst:5", clean_acc=0.5, robust_acc=0.125),
        _row(defense="hetpure", attack="AutoAttack-rand", data_source="cifar10-official", diffusion_model="score-sde-ddpmpp",
             classifier="wrn-28-10-standard", n_images=512, clean_acc=0.9, robust_acc=0.8, wall_s=900.0),
        _row(defense="gdmp", clean_acc=0.9, robust_acc=0.9, sanity="FAILED: gradients (0/8 non-zero)"),
    ]
    for t_star, robust in ((0.05, 0.1), (0.1, 0.3), (0.2, 0.4)):
        rows.append(_row(defense="diffpure", defense_config=f"t_star={t_star} sampler=ddim", n_images=16,
                         clean_acc=1 - t_star, robust_acc=robust))
    return rows


def _png_size(path):
    data = path.read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n" and data[12:16] == b"IHDR"
    return struct.unpack(">II", data[16:24])


def test_side_by_side_puts_published_and_measured_numbers_in_their_cells():
    table = side_by_side(PUBLISHED, _rows())
    hetpure = table[table.method == "hetpure"].set_index("measured setup")
    assert set(table.method) == {"hetpure", "diffpure"}  # references are not purification methods
    assert (hetpure["published clean"] == 93.16).all() and (hetpure["published robust"] == 80.45).all()
    smoke_single = hetpure[hetpure.index.str.contains("cifar10-jpeg") & hetpure.index.str.endswith("evaluation single")]
    assert smoke_single["measured robust"].tolist() == ["25.0 [12.0, 44.0]"]  # the stronger of the two attacks
    assert smoke_single["measured clean"].tolist() == ["75.0 [60.0, 90.0]"]
    assert smoke_single["same setup"].iloc[0].startswith("NO: data_source cifar10-jpeg (published: cifar10-official)")
    assert "attack PGD-EOT (published: AutoAttack)" in smoke_single["same setup"].iloc[0]
    paper = hetpure[hetpure.index.str.contains("cifar10-official")]
    assert paper["same setup"].tolist() == ["yes"] and paper["measured robust"].tolist() == ["80.0 [-]"]
    assert not hetpure.index.str.endswith("worst:5").any()  # a one-shot number is set beside one-shot rows only
    diffpure = table[table.method == "diffpure"]
    assert sorted(diffpure["measured robust"]) == ["10.0 [-]", "30.0 [-]", "40.0 [-]"]  # each t* is its own defense setup
    assert not any("gdmp" in setup for setup in table["measured setup"])  # failed sanity: never a headline


def test_robustbench_entries_are_written_with_the_leaderboard(tmp_path):
    with store_with(tmp_path / "s.sqlite", _rows()) as store:
        write_leaderboards(store, tmp_path)
    entries = json.loads((tmp_path / "cifar10-jpeg-Linf.robustbench.json").read_text())
    by_attack = {(e["name"], e["external"], e["autoattack_acc"]) for e in entries}
    assert ("hetpure (c + d)", "25.00", "") in by_attack and ("hetpure (c + d)", "50.00", "50.00") in by_attack
    worst = next(e for e in entries if "evaluation worst:5" in e["footnote"])
    assert worst["number_forward_passes"] == 5 and worst["diffusion_calls_per_purification"] == 10
    assert worst["clean_acc"] == "50.00" and worst["eps"] == "0.0313725" and worst["dataset"] == "cifar10"


def test_each_figure_is_a_png_of_the_expected_size(tmp_path):
    rows = _rows()
    assert _png_size(scatter_plot(rows, PUBLISHED, tmp_path / "a.png")) == (1000, 600)
    assert _png_size(strength_plot(rows, tmp_path / "b.png")) == (1000, 600)
    assert _png_size(cost_plot(rows, tmp_path / "c.png")) == (1000, 600)
    assert _png_size(strength_plot([], tmp_path / "empty.png")) == (1000, 600)  # an empty store still draws
    stage = {"image": torch.rand(8, 8, 3).numpy(), "title": "x"}
    panels = {"hetpure": [{"label": "cat", "stages": [stage] * 5}] * 2, "diffpure": [{"label": "dog", "stages": [stage] * 4}]}
    assert _png_size(image_grid_plot(panels, tmp_path / "d.png")) == (5 * 160, 3 * 175)


def test_the_image_grid_is_captioned_with_its_setup(tmp_path):
    import matplotlib.image

    stage = {"image": np.ones((8, 8, 3)), "title": ""}  # white panels, no titles: only a caption can mark the top
    panels = {"hetpure": [{"label": "", "stages": [stage] * 2}]}
    top = lambda path: matplotlib.image.imread(path)[:12, :, :3]  # noqa: E731  (the caption's band)
    plain = top(image_grid_plot(panels, tmp_path / "plain.png"))
    captioned = top(image_grid_plot(panels, tmp_path / "captioned.png", caption="preset p: APGD-EOT, gradient full"))
    assert plain.min() == 1.0 and captioned.min() < 0.5  # black caption text on the white band


def test_error_bars_come_from_the_rows_intervals(tmp_path):
    rows = [_row(clean_acc=0.75, clean_ci=[0.5, 0.875], robust_acc=0.25, robust_ci=[0.125, 0.5]), _row()]  # 2nd: none
    assert error_lengths(rows, "clean").tolist() == [[25.0, 0.0], [12.5, 0.0]]  # (below, above) in points
    assert error_lengths(rows, "robust").tolist() == [[12.5, 0.0], [25.0, 0.0]]
    with_bars = [{**r, "clean_ci": [r["clean_acc"] - 0.2, r["clean_acc"] + 0.05],
                  "robust_ci": [max(0, r["robust_acc"] - 0.1), r["robust_acc"] + 0.15]} for r in _rows()]
    for plot in (lambda rows, path: scatter_plot(rows, PUBLISHED, path), strength_plot):
        plain, drawn = plot(_rows(), tmp_path / "plain.png"), plot(with_bars, tmp_path / "bars.png")
        assert plain.read_bytes() != drawn.read_bytes()  # the intervals are drawn


def test_a_report_regenerated_from_the_same_rows_is_identical(tmp_path):
    first = write_report(_rows(), "r", tmp_path / "one", "store.sqlite", PUBLISHED)
    second = write_report(_rows(), "r", tmp_path / "two", "store.sqlite", PUBLISHED)
    files = sorted(p.name for p in first.parent.iterdir())
    assert files == ["convergence.png", "cost.png", "report.md", "robust_vs_clean.png", "strength.png"]
    for name in files:
        assert (first.parent / name).read_bytes() == (second.parent / name).read_bytes(), name
    text = first.read_text()
    assert "| hetpure | 93.16 | 80.45 |" in text and "FAILED: gradients" in text
    assert "## Leaderboard: cifar10-jpeg, Linf eps 0.0313725" in text
    assert "| hetpure | PGD-EOT | full | single | 75.0 [60.0, 90.0] | 25.0 [12.0, 44.0] | - | - | 10 |" in text
    assert "(not made: they need the result store's per-image results)" in text  # no store given


@pytest.mark.parametrize("name, expected", [
    ("hetpure", ["purified", "mask", "noised t_l=40/t_s=20"]),
    ("diffpure", ["purified", "noised t=40"]),
    ("none", ["purified"]),
])
def test_stages_start_with_the_purification_the_evaluation_sees(name, expected):
    classifier, diffusion = tiny_models()
    overrides = {"hetpure": {"t_l": 40, "t_s": 20, "stride": 20}, "diffpure": {"t_star": 0.04, "sampler": "ddim", "ddim_stride": 20}}
    defense = build_defense(name, classifier, diffusion, overrides.get(name, {}))
    x = torch.rand(2, 3, 8, 8, generator=torch.Generator().manual_seed(0))
    defense.reseed([1, 2])
    stages = defense.stages(x)
    defense.reseed([1, 2])
    assert [n for n, _ in stages] == expected and torch.equal(stages[0][1], defense.purify(x))
    for stage_name, image in stages:
        assert image.shape == ((2, 1, 8, 8) if stage_name == "mask" else x.shape)
        assert image.min() >= 0 and image.max() <= 1


def test_figures_of_a_store_without_single_rows_draw_its_expected_rows():
    # The reference preset judges expected:10, worst:10 and vote:20 only: its figures must not be empty.
    from hetpure_bench.reporting.plots import cost_rows, headline_rows, plotted_mode

    rows = [_row(attack="suite(A + B)", evaluation="expected:10", robust_acc=0.3),
            _row(attack="suite(A + B)", evaluation="vote:20", robust_acc=0.1),
            _row(defense="diffpure", attack="suite(A + B)", evaluation="expected:10", robust_acc=0.2),
            _row(attack="PGD-EOT", evaluation="expected:10", robust_acc=0.25),
            _row(defense="none", attack="suite(A; skipped, not applicable: B)", evaluation="expected:10", robust_acc=0.0)]
    assert plotted_mode(rows) == "expected:10" and plotted_mode(_rows()) == "single" and plotted_mode([]) is None
    assert [(r["defense"], r["robust_acc"]) for r in headline_rows(rows)] == [("diffpure", 0.2), ("hetpure", 0.25), ("none", 0.0)]
    # cost: the attack every defense ran (not PGD-EOT, which only hetpure has), in the plotted mode
    assert {(r["defense"], r["attack"], r["evaluation"]) for r in cost_rows(rows)} == {
        ("hetpure", "suite(A + B)", "expected:10"), ("diffpure", "suite(A + B)", "expected:10"),
        ("none", "suite(A; skipped, not applicable: B)", "expected:10")}  # the same suite, a member skipped
