"""Intervals in rows, the compare command and the report's paired comparisons, on small stores
built here from constructed per-image outcomes (hand-computed differences and p-values)."""

import hashlib
import math

import numpy as np
import pytest

from hetpure_bench.bench.rows import make_row
from hetpure_bench.bench.store import ResultStore, setup_hash
from hetpure_bench.cli import main
from hetpure_bench.errors import UserError
from hetpure_bench.reporting.accuracy_cells import accuracy_cell
from hetpure_bench.reporting.comparison import find_row, report_section
from hetpure_bench.reporting.report import write_report

N = 32
PGD = "PGD-EOT(Linf, 10 steps, EOT 2)"
HETPURE_CONFIG = "t_l=200 t_s=100 mask.hooks=layer1,layer2 mask.tau=0.9"
Z95 = 1.959963984540054


def wilson_by_hand(k, n, z=Z95):
    p = k / n
    centre = (p + z * z / (2 * n)) / (1 + z * z / n)
    half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / (1 + z * z / n)
    return centre - half, centre + half


def _outcomes(*runs):
    """(count, value) runs -> a list of per-image outcomes."""
    return [value for count, value in runs for _ in range(count)]


def _add(store, clean, robust, indices=range(N), modes=("single",), checks=(), **labels):
    """Register a setup, commit its per-image records (the same outcomes for every mode) and
    save its rows as the runner does (rows.make_row, with these sanity ``checks``); returns
    the setup hash."""
    indices = list(indices)
    setup = {"defense": "hetpure", "defense_config": HETPURE_CONFIG, "classifier": "c", "diffusion_model": "d",
             "data_source": "cifar10-jpeg", "threat": "Linf", "eps": "0.0313725", "attack": PGD,
             "gradient_mode": "full", "n_images": len(indices), "seed": 0, "preset": "smoke",
             "image_indices_sha256": hashlib.sha256(np.asarray(indices, dtype=np.int64).tobytes()).hexdigest(),
             "evaluation_modes": list(modes), **labels}
    key = setup_hash(setup)
    store.register(key, setup)
    records = [{"index": i, "label": 0, "clean_pred": 0 if c == 1 else 1, "adv_pred": 0 if r == 1 else 1,
                "clean_correct": c if isinstance(c, float) else bool(c), "robust_correct": r if isinstance(r, float) else bool(r)}
               for i, c, r in zip(indices, clean, robust)]
    cost = {"attack_s": 1.0, "eval_s": dict.fromkeys(modes, 0.5), "peak_mib": 100, "device": "cpu"}
    store.commit_batch(key, 0, {mode: records for mode in modes}, cost)
    frames = {mode: store.per_image(key, mode) for mode in modes}
    store.save_rows(key, {mode: make_row(setup, mode, frames[mode], [cost], list(checks), 0.0, 10, []) for mode in modes})
    return key


@pytest.fixture
def store(tmp_path):
    """hetpure and diffpure on the same 32 images: robust outcomes with 1 image only hetpure gets
    right, 9 only diffpure, 20 both, 2 neither (McNemar p = 2 (1 + 10) / 2^10); clean outcomes
    with 3 images only hetpure gets right (p = 2 / 2^3)."""
    with ResultStore(tmp_path / "results.sqlite") as s:
        s.keys = {
            "hetpure": _add(s, clean=_outcomes((29, 1), (3, 0)), robust=_outcomes((1, 1), (9, 0), (20, 1), (2, 0)),
                            modes=("single", "worst:2")),
            "diffpure": _add(s, clean=_outcomes((26, 1), (6, 0)), robust=_outcomes((1, 0), (9, 1), (20, 1), (2, 0)),
                             defense="diffpure", defense_config="t_star=0.1 sampler=ddim"),
            "other images": _add(s, clean=[1] * 16, robust=[0] * 16, indices=range(100, 116), defense="none",
                                 defense_config="-", diffusion_model="-"),
        }
        yield s


def test_rows_carry_wilson_intervals_of_their_per_image_outcomes(store):
    row = find_row(store.rows(), store.keys["hetpure"][:8], "single")
    assert row["clean_acc"] == 29 / 32 and row["robust_acc"] == 21 / 32
    assert row["clean_ci"] == pytest.approx(wilson_by_hand(29, 32)) and row["robust_ci"] == pytest.approx(wilson_by_hand(21, 32))
    assert row["interval_method"] == "Wilson 95%"
    assert accuracy_cell(row, "robust") == f"65.6 [{100 * wilson_by_hand(21, 32)[0]:.1f}, {100 * wilson_by_hand(21, 32)[1]:.1f}]"
    old = {k: v for k, v in row.items() if k not in ("clean_ci", "robust_ci", "interval_method")}
    assert accuracy_cell(old, "clean") == "90.6 [-]"  # a row stored before intervals were


def test_fractional_outcomes_get_a_seeded_bootstrap_interval(tmp_path):
    fractions = [0.0, 0.25, 0.5, 0.75, 1.0, 1.0, 0.5, 0.25]
    with ResultStore(tmp_path / "s.sqlite") as s:
        key = _add(s, clean=fractions, robust=fractions[::-1], indices=range(8), modes=("expected:4",))
        (row,) = s.rows()
    assert row["robust_acc"] == pytest.approx(np.mean(fractions))
    assert row["interval_method"] == "bootstrap 95% over images (seed 0)"
    assert row["robust_ci"][0] < row["robust_acc"] < row["robust_ci"][1]
    with ResultStore(tmp_path / "t.sqlite") as s:  # the same outcomes give the same interval
        assert _add(s, clean=fractions, robust=fractions[::-1], indices=range(8), modes=("expected:4",)) == key
        assert s.rows()[0]["robust_ci"] == row["robust_ci"]


def test_compare_prints_the_hand_computed_difference_and_p_value(store, capsys):
    a, b = store.keys["hetpure"][:8] + ":single", "defense=diffpure"
    assert main(["compare", a, b, "--store", str(store.path)]) == 0
    out = capsys.readouterr().out
    assert "same images: cifar10-jpeg, 32 images" in out
    assert f"A: setup {store.keys['hetpure'][:12]}:single  defense=hetpure; defense_config={HETPURE_CONFIG}" in out
    assert "B: setup" in out and "defense=diffpure; defense_config=t_star=0.1 sampler=ddim" in out
    robust = next(line for line in out.splitlines() if line.startswith("robust accuracy:"))
    # 21/32 - 29/32 = -25 points; 1 vs 9 discordant images: p = 22/1024 = 0.0215.
    assert "A below B by -25.0 points" in robust and "McNemar exact p = 0.0215 (1 vs 9 discordant images)" in robust
    clean = next(line for line in out.splitlines() if line.startswith("clean accuracy:"))
    # 29/32 - 26/32 = +9.4 points; 3 vs 0 discordant images: p = 2/8; the interval contains 0.
    assert clean.startswith("clean accuracy: A vs B: not distinguishable at n = 32 (+9.4 points [")
    assert "p = 0.25 (3 vs 0 discordant images)" in clean
    assert "A: clean 90.6 [" in out and "robust 65.6 [" in out and "(Wilson 95%)" in out


def test_rows_named_by_labels_with_commas_and_equals_in_their_values(store):
    rows = store.rows()
    row = find_row(rows, f"defense_config={HETPURE_CONFIG},attack={PGD},evaluation=worst:2")
    assert (row["setup_hash"], row["evaluation"]) == (store.keys["hetpure"], "worst:2")
    assert find_row(rows, "defense=hetpure", mode="single")["evaluation"] == "single"
    assert find_row(rows, store.keys["diffpure"][:6])["defense"] == "diffpure"


@pytest.mark.parametrize("name, message", [
    ("defense=hetpure", "2 rows have defense=hetpure; add labels or name one by setup hash"),
    ("HETPURE", "prefix of >= 6 hex characters"),
    ("abc", "prefix of >= 6 hex characters"),
    ("defense=gdmp", "no row has defense=gdmp (defense in the store: diffpure, hetpure, none)"),
    ("colour=red", "name a row by labels COLUMN=VALUE with columns among"),
])
def test_unknown_or_ambiguous_names_are_one_line_errors(store, capsys, name, message):
    assert main(["compare", name, "defense=diffpure", "--store", str(store.path)]) == 2
    err = capsys.readouterr().err
    assert message in err and err.count("\n") == 1


def test_a_setup_with_several_modes_needs_one_named(store, capsys):
    prefix = store.keys["hetpure"][:10]
    assert main(["compare", prefix, "defense=diffpure", "--store", str(store.path)]) == 2
    assert "has rows for several evaluation modes: add :MODE or --mode (single, worst:2)" in capsys.readouterr().err
    with pytest.raises(UserError, match="no row for evaluation mode 'vote:3'"):
        find_row(store.rows(), prefix + ":vote:3")
    assert main(["compare", prefix, "defense=diffpure", "--mode", "single", "--store", str(store.path)]) == 0


def test_rows_on_other_images_are_refused(store, capsys):
    assert main(["compare", "defense=none", "defense=diffpure", "--store", str(store.path)]) == 2
    err = capsys.readouterr().err
    assert "are not on the same images (cifar10-jpeg, 16 images" in err and err.count("\n") == 1
    assert main(["compare", "defense=none", "defense=diffpure", "--store", str(store.path.parent / "nope.sqlite")]) == 2
    assert "no result store at" in capsys.readouterr().err


def _report_store(path):
    """On 32 images under PGD: hetpure, diffpure (two configurations) and none; hetpure also under
    AutoAttack (stronger) and BPDA, and an attack whose sanity checks failed (lowest, never the
    reference). Under AutoAttack, hetpure's expected:4 outcomes are fractions."""
    s = ResultStore(path)
    robust_h = _outcomes((1, 1), (9, 0), (20, 1), (2, 0))  # 21/32
    robust_d = _outcomes((1, 0), (9, 1), (20, 1), (2, 0))  # 29/32: 1 vs 9 against hetpure
    _add(s, [1] * N, robust_h)
    _add(s, [1] * N, robust_d, defense="diffpure", defense_config="t_star=0.1 sampler=ddim")
    _add(s, [1] * N, _outcomes((20, 1), (12, 0)), defense="diffpure", defense_config="t_star=0.2 sampler=ddim")
    _add(s, [1] * N, _outcomes((2, 1), (30, 0)), defense="none", defense_config="-", diffusion_model="-")
    _add(s, [1] * N, _outcomes((20, 1), (12, 0)), attack="AutoAttack-rand(10 iter, EOT 2)")  # 20/32, below hetpure's 21
    _add(s, [1] * N, _outcomes((21, 1), (11, 0)), gradient_mode="bpda")
    _add(s, [1] * N, [0] * N, attack="broken", checks=[{"name": "gradients", "passed": False, "detail": "0/8 non-zero"}])
    return s


def test_the_report_compares_defenses_and_attacks_on_the_same_images(tmp_path):
    with _report_store(tmp_path / "r.sqlite") as s:
        text = report_section(s.rows(), s)
    defenses, attacks = text.split("### Each attack vs the strongest")
    # Of the two diffpure configurations the more robust one (t_star=0.1, 29/32) is the reference.
    assert ("- hetpure below diffpure [t_star=0.1] by -25.0 points" in defenses
            and "McNemar exact p = 0.0215 (1 vs 9 discordant images)" in defenses)
    assert "- diffpure [t_star=0.2] below diffpure [t_star=0.1]" not in defenses  # diffpure is not compared with itself
    # hetpure 21/32 vs none 2/32 (images 0 and 1): +59.4 points; 20 vs 1 discordant images,
    # p = 2 (1 + 21) / 2^21.
    assert "- hetpure above none by +59.4 points" in defenses and f"p = {44 / 2 ** 21:.3g} (20 vs 1 discordant" in defenses
    assert "diffpure [t_star=0.1] above none" in defenses and "diffpure [t_star=0.2] above none" in defenses
    assert defenses.count("\n- ") == 4  # hetpure vs diffpure; hetpure and both diffpure vs none
    # The strongest attack on hetpure whose sanity passed: AutoAttack at 20/32; each other attack vs it.
    assert "strongest: AutoAttack-rand(10 iter, EOT 2) (gradient full), robust 62.5 [" in attacks
    # PGD 21/32 vs AutoAttack 20/32: +3.1 points, not distinguishable at n = 32.
    assert f"- {PGD} (gradient full) vs the strongest: not distinguishable at n = 32 (+3.1 points [" in attacks
    assert f"- {PGD} (gradient bpda) vs the strongest: not distinguishable at n = 32" in attacks
    assert "- broken (gradient full) below the strongest by -62.5 points" in attacks


def test_a_report_with_comparisons_is_identical_when_regenerated(tmp_path):
    fractions = [0.25, 0.5, 0.75, 1.0] * 8
    with _report_store(tmp_path / "r.sqlite") as s:
        _add(s, fractions, fractions[::-1], modes=("expected:4",))
        _add(s, fractions[::-1], fractions, modes=("expected:4",), defense="none", defense_config="-", diffusion_model="-")
        rows = s.rows()
        first = write_report(rows, "r", tmp_path / "one", "r.sqlite", [], store=s)
        second = write_report(rows, "r", tmp_path / "two", "r.sqlite", [], store=s)
    assert first.read_bytes() == second.read_bytes()
    text = first.read_text()
    assert "**PGD-EOT(Linf, 10 steps, EOT 2), gradient full, evaluation expected:4**" in text
    # Fractional outcomes: a paired bootstrap interval and no McNemar test.
    assert "\n- hetpure vs none: not distinguishable at n = 32 (+0.0 points [-" in text
    assert text.count("McNemar exact p") == 7  # the 0/1 rows' pairs only
    assert "| hetpure | PGD-EOT(Linf, 10 steps, EOT 2) | full | single | 100.0 [89.3, 100.0] | 65.6 [" in text


def test_the_run_summary_line_shows_intervals_and_n(capsys):
    from hetpure_bench.cli import _report

    row = {"defense": "hetpure", "defense_config": "x", "classifier": "c", "diffusion_model": "d",
           "data_source": "cifar10-jpeg", "n_images": 32, "seed": 0, "attack": PGD, "threat": "Linf",
           "eps": "0.0313725", "gradient_mode": "full", "evaluation": "single", "clean_acc": 27 / 32,
           "robust_acc": 9 / 32, "clean_ci": list(wilson_by_hand(27, 32)), "robust_ci": list(wilson_by_hand(9, 32)),
           "interval_method": "Wilson 95%", "nfe": 10, "wall_s": 1.0, "images_per_s": 32.0, "peak_mem_mib": 1,
           "device": "cpu", "sanity_wall_s": 0.0, "robust_by_attack": "-", "sanity": "ok", "setup_hash": "ab" * 32}
    _report(row, "lb", "lb/results.sqlite")
    low, high = wilson_by_hand(9, 32)
    assert (f"clean 84.4 [68.2, 93.1]  robust 28.1 [{100 * low:.1f}, {100 * high:.1f}] (%, Wilson 95%, n = 32)"
            in capsys.readouterr().out)
