"""The shipped published results: what they contain, and that robust-only entries pass through the
report's table and scatter plot."""

from importlib import resources

import pytest
import yaml

from hetpure_bench.bench.evaluation import parse_evaluation_mode
from hetpure_bench.reporting.plots import scatter_plot
from hetpure_bench.reporting.published import KINDS, load_published
from hetpure_bench.reporting.tables import side_by_side

# The heterogeneous-noise paper's two comparison tables (METHOD.md): (classifier, method) -> (standard, robust).
PAPER_TABLES = {
    ("wrn-28-10", "Gowal et al. (AT)"): (88.54, 63.38),
    ("wrn-28-10-standard", "Bai et al. (AP)"): (91.41, 77.08),
    ("wrn-28-10-standard", "Lee et al. (AP)"): (90.16, 70.47),
    ("wrn-28-10-standard", "Lin et al. (AP)"): (90.62, 72.85),
    ("wrn-28-10-standard", "hetpure"): (93.16, 80.45),
    ("wrn-70-16", "Rebuffi et al. (AT)"): (92.22, 66.56),
    ("wrn-70-16", "Bai et al. (AP)"): (92.97, 79.10),
    ("wrn-70-16", "Lin et al. (AP)"): (91.99, 76.37),
    ("wrn-70-16-dm", "hetpure"): (93.36, 84.83),
}


def _shipped_yaml():
    return yaml.safe_load((resources.files("hetpure_bench.reporting") / "published.yaml").read_text())


def test_the_shipped_file_loads_and_every_entry_states_its_evaluation():
    published = load_published()
    assert len(published) == len(_shipped_yaml()) == 36
    assert all("evaluation" in entry for entry in _shipped_yaml())  # stated, not the fixture default
    for entry in published:
        kind, passes = parse_evaluation_mode(entry.evaluation)
        assert kind in ("single", "vote", "worst", "expected") and passes >= 1
        assert entry.kind in KINDS and entry.threat == "Linf" and entry.eps == "8/255"
        assert entry.clean is None or 0 <= entry.clean <= 100
        assert 0 <= entry.robust <= 100
        if entry.verified and not entry.source.startswith("RobustBench"):
            assert "via METHOD.md" in entry.source or "via ATTACKS.md" in entry.source


def test_it_holds_exactly_the_nine_rows_of_the_papers_tables():
    published = load_published()
    table_rows = [p for p in published if "Pei et al." in p.source]
    assert {(p.classifier, p.method): (p.clean, p.robust) for p in table_rows} == PAPER_TABLES
    assert len(table_rows) == 9  # none duplicated
    by_key = {(p.classifier, p.method): p for p in table_rows}
    bai = by_key[("wrn-70-16", "Bai et al. (AP)")]
    assert (bai.clean, bai.robust, bai.kind) == (92.97, 79.10, "purification-other")
    rebuffi = by_key[("wrn-70-16", "Rebuffi et al. (AT)")]
    assert (rebuffi.clean, rebuffi.robust, rebuffi.kind) == (92.22, 66.56, "reference")
    for p in table_rows:
        assert p.verified and "via METHOD.md" in p.source and p.attack.startswith("AutoAttack")
        assert p.kind == {"AT": "reference", "AP": "purification-other"}.get(p.method[-3:-1], "purification")
    hetpure = [p for p in published if p.method == "hetpure"]
    assert len(hetpure) == 2
    for p in hetpure:
        assert p.evaluation == "vote:20"
        assert "rand" in p.attack and "2-call surrogate" in p.attack and "detached mask" in p.attack


@pytest.mark.parametrize("method, classifier, robust, evaluation", [
    ("diffpure", "wrn-28-10-standard", 46.88, "single"),  # DiffAttack
    ("diffpure", "wrn-70-16", 45.31, "single"),
    ("diffpure", "wrn-28-10-standard", 48.0, "single"),  # Lee & Kim, approximate
    ("diffpure", "wrn-70-16", 52.73, "expected:10"),  # DiffHammer PGD-EOT Avg / Wor
    ("diffpure", "wrn-70-16", 31.05, "worst:10"),
    ("diffpure", "wrn-70-16", 22.66, "worst:10"),  # DiffHammer Wor
    ("gdmp", "wrn-70-16", 41.64, "expected:10"),
    ("diffpure", "wrn-70-16", 17.19, "worst:10"),  # DiffBreak APGD worst-case / vote
    ("diffpure", "wrn-70-16", 39.45, "vote:10"),
    ("gdmp", "wrn-70-16", 16.80, "vote:10"),
    ("gdmp", "wrn-70-16", 7.81, "worst:10"),  # DiffHammer with exact gradients
])
def test_the_fields_re_evaluations_are_there_robust_only(method, classifier, robust, evaluation):
    found = [p for p in load_published() if (p.method, p.classifier, p.robust) == (method, classifier, robust)]
    assert len(found) == 1
    entry = found[0]
    assert entry.evaluation == evaluation and entry.clean is None and entry.kind == "purification"
    assert entry.verified and "via ATTACKS.md" in entry.source


def test_re_evaluations_number_and_caveats():
    re_evaluations = [p for p in load_published() if "via ATTACKS.md" in p.source and p.clean is None]
    assert len(re_evaluations) == 21
    assert all("which WRN-70-16" in p.source for p in re_evaluations if p.classifier == "wrn-70-16")
    lee_kim = next(p for p in re_evaluations if "Lee & Kim" in p.source)
    assert "approximate" in lee_kim.source


def test_an_unknown_evaluation_mode_or_kind_is_refused():
    with pytest.raises(Exception, match="unknown evaluation mode"):
        load_published("- {method: x, classifier: c, threat: Linf, eps: 8/255, clean: 1, robust: 1, attack: a, "
                       "source: s, verified: false, evaluation: best:3}")
    with pytest.raises(ValueError, match="unknown kind"):
        load_published("- {method: x, classifier: c, threat: Linf, eps: 8/255, clean: 1, robust: 1, attack: a, "
                       "source: s, verified: false, kind: other}")


ROBUST_ONLY = """
- {method: diffpure, classifier: wrn-70-16, threat: Linf, eps: 8/255, clean: null, robust: 22.66,
   attack: DiffHammer, evaluation: "worst:10", source: s, verified: true}
- {method: diffpure, classifier: wrn-28-10-standard, threat: Linf, eps: 8/255, clean: 89.02, robust: 70.64,
   attack: AutoAttack, evaluation: single, source: s, verified: true}
- {method: Bai et al. (AP), kind: purification-other, classifier: wrn-70-16, threat: Linf, eps: 8/255,
   clean: 92.97, robust: 79.10, attack: AutoAttack, evaluation: single, source: s, verified: true}
"""


def _row(**changes):
    row = {"defense": "diffpure", "defense_config": "t_star=0.1", "classifier": "wrn-28-10-standard",
           "diffusion_model": "score-sde-ddpmpp", "data_source": "cifar10-official", "threat": "Linf",
           "eps": "8/255", "n_images": 512, "seed": 0, "evaluation": "single", "attack": "AutoAttack-rand",
           "gradient_mode": "full", "clean_acc": 0.875, "robust_acc": 0.5, "sanity": "ok", "nfe": 100}
    return {**row, **changes}


def test_a_robust_only_entry_passes_through_side_by_side():
    table = side_by_side(load_published(ROBUST_ONLY), [_row()])
    assert list(table.method) == ["diffpure", "diffpure"]  # other papers' purifiers are not measured here
    robust_only = table[table["published robust"] == 22.66].iloc[0]
    assert robust_only["published clean"] == "-"
    assert "evaluation worst:10" in robust_only["published setup"]
    assert "evaluation single (published: worst:10)" in robust_only["same setup"]
    assert table[table["published robust"] == 70.64].iloc[0]["same setup"] == "yes"


def test_side_by_side_pairs_a_published_number_with_the_measured_row_of_its_evaluation_mode():
    rows = [_row(evaluation=mode, robust_acc=r) for mode, r in (("vote:20", 0.4), ("expected:10", 0.35), ("worst:10", 0.1))]
    table = side_by_side(load_published(MODES), rows)
    by_published = {p: sorted(table[table["published robust"] == p]["measured robust"]) for p in (80.45, 70.64, 31.05, 1.0)}
    assert by_published[80.45] == ["40.0 [-]"]  # vote:20 with vote:20 only
    assert by_published[31.05] == ["10.0 [-]"]  # worst:10 with worst:10 only
    assert by_published[70.64] == ["35.0 [-]"]  # a one-shot number with expected:K, its unbiased estimate
    assert by_published[1.0] == ["40.0 [-]"]  # vote:5 with the vote of another count
    unmatched = side_by_side(load_published(MODES), rows[1:])  # no vote measured: every mode, each labelled
    assert sorted(unmatched[unmatched["published robust"] == 80.45]["measured robust"]) == ["10.0 [-]", "35.0 [-]"]
    one_shot = table[table["published robust"] == 70.64].iloc[0]["same setup"]
    assert "evaluation expected:10 (published: single)" in one_shot


MODES = """
- {method: diffpure, classifier: wrn-28-10-standard, threat: Linf, eps: 8/255, clean: 90, robust: 80.45,
   attack: AutoAttack, evaluation: "vote:20", source: s, verified: true}
- {method: diffpure, classifier: wrn-28-10-standard, threat: Linf, eps: 8/255, clean: 89.02, robust: 70.64,
   attack: AutoAttack, evaluation: single, source: s, verified: true}
- {method: diffpure, classifier: wrn-70-16, threat: Linf, eps: 8/255, clean: null, robust: 31.05,
   attack: PGD-EOT, evaluation: "worst:10", source: s, verified: true}
- {method: diffpure, classifier: wrn-70-16, threat: Linf, eps: 8/255, clean: null, robust: 1.0,
   attack: PGD-EOT, evaluation: "vote:5", source: s, verified: true}
"""


def test_side_by_side_of_the_shipped_file_prints_a_dash_for_missing_clean():
    table = side_by_side(load_published(), [_row()])
    assert set(table.method) == {"hetpure", "diffpure", "gdmp"}
    assert (table[table["published robust"] == 46.88]["published clean"] == "-").all()


def test_the_scatter_plot_skips_points_without_clean(tmp_path):
    for published in (load_published(ROBUST_ONLY), load_published()):
        path = scatter_plot([_row()], published, tmp_path / "robust_vs_clean.png")
        assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    with_only = scatter_plot([_row()], load_published(ROBUST_ONLY), tmp_path / "a.png").read_bytes()
    without = scatter_plot([_row()], load_published(ROBUST_ONLY)[1:], tmp_path / "b.png").read_bytes()
    assert with_only == without  # the robust-only entry draws nothing
