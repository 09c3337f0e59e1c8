"""The protocol-inflation study (bench/protocol_study.py, reporting/protocol_study.py) and the
cpu-reference preset's size."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest
import torch
from conftest import write_image_tar

from hetpure_bench.bench.cost import PassTimes, estimate
from hetpure_bench.bench.dry_run import _defense_nfe
from hetpure_bench.bench.protocol_study import step_result, study_modes, study_steps, transitions
from hetpure_bench.bench.spec import evaluation_modes, load_preset, placeholder_defense, row_attack_label, row_attacks, spec_from_preset
from hetpure_bench.cli import main
from hetpure_bench.reporting.protocol_study import staircase_table, transition_table

# The cpu-reference preset's rows together: at most this many diffusion-network calls (each row's
# attack plus its costliest evaluation mode, summed over its 128 images). About 2.7 million today:
# `run --preset cpu-reference --dry-run` estimates 1.0 hour per 10-call row on 2 CPU cores, so
# the preset is a multi-session job, run resumably row by row.
MAX_PRESET_CALLS = 3_000_000


def test_cpu_reference_preset_cost_stays_under_its_bound():
    total = 0
    unit = PassTimes("cpu", 1, 1.0, 1.0, 1.0, 1.0)
    for defense in load_preset("cpu-reference")["defenses"]:
        spec = spec_from_preset("cpu-reference", defense)
        assert spec.n_images >= 128 and spec.evaluation == "expected:10,worst:10,vote:20"
        model = placeholder_defense(spec)
        attacks, _ = row_attacks(spec, model)
        nfe, surrogate_nfe = _defense_nfe(spec, model)
        total += spec.n_images * max(estimate(attacks, nfe, spec.gradient, mode, spec.n_images, unit, surrogate_nfe).network_calls_per_image
                                     for mode in evaluation_modes(spec))
    assert 0 < total <= MAX_PRESET_CALLS


def test_study_steps_change_one_choice_at_a_time():
    steps = study_steps("hetpure")
    assert [s.key for s in steps] == ["a", "b", "c", "d"]
    (a,), (b,), (c,) = steps[0].specs, steps[1].specs, steps[2].specs
    assert (a.attack["name"], a.gradient) == ("pgd-eot", "surrogate:2") and (b.attack["name"], b.gradient) == ("pgd-eot", "full")
    assert a.attack == b.attack  # only the gradient changes from (a) to (b)
    assert row_attack_label(c) == "APGD-EOT(Linf, margin, 10 iter, EOT 2, 1 restart)"
    assert [s.attack["name"] for s in steps[3].specs] == ["suite", "mask-avoiding-apgd", "mask-aware-apgd"]
    assert steps[3].specs[2].attack["anneal"] == [0.5, 0.01]
    assert len({(s.n_images, s.seed, s.evaluation) for step in steps for s in step.specs}) == 1  # the same images
    assert [s.attack["name"] for s in study_steps("diffpure")[3].specs] == ["suite"]  # no mask: no mask attacks
    assert study_modes(steps) == ["vote:20", "expected:10", "worst:10"]  # the authors' mode first


class FakeStore:
    """What step_result reads: per-image records by setup hash and mode."""

    def __init__(self, frames: dict[tuple[str, str], pd.DataFrame]):
        self.frames = frames

    def per_image(self, key: str, mode: str) -> pd.DataFrame:
        return self.frames.get((key, mode), pd.DataFrame())


def _row(spec, key: str) -> dict:
    return {"preset": spec.preset, "defense": spec.defense, "attack": row_attack_label(spec),
            "gradient_mode": spec.gradient, "n_images": spec.n_images, "seed": spec.seed, "setup_hash": key}


def _frame(robust: list[float], clean: list[float] | None = None) -> pd.DataFrame:
    return pd.DataFrame({"index": range(len(robust)), "robust_correct": robust, "clean_correct": clean or [1.0] * len(robust)})


def test_a_step_with_several_rows_keeps_the_per_image_worst_case():
    step = study_steps("hetpure")[3]
    rows = [_row(spec, f"k{i}") for i, spec in enumerate(step.specs)]
    store = FakeStore({("k0", "vote:20"): _frame([1, 1, 0, 1]), ("k1", "vote:20"): _frame([1, 0, 1, 1]),
                       ("k2", "vote:20"): _frame([1, 1, 1, 0])})
    result = step_result(store, step, rows, ["vote:20"])
    assert result.robust["vote:20"].tolist() == [1, 0, 0, 0] and result.missing == ()
    assert result.accuracy("vote:20").value == 0.25
    partial = step_result(store, step, rows[:2], ["vote:20"])  # one row not stored: the step is pending
    assert partial.robust == {} and partial.missing == ("hetpure mask-aware-apgd (full)",)
    assert staircase_table([partial], ["vote:20"]).loc[0, "robust vote:20"] == "pending"


def test_transitions_are_paired_with_an_exact_mcnemar_test():
    steps = study_steps("diffpure")[:2]
    rows = [_row(steps[0].specs[0], "a"), _row(steps[1].specs[0], "b")]
    # 10 images: (a) robust on 8; (b) loses 3 of them and gains none: 3 vs 0 discordant, p = 2 / 2^3.
    store = FakeStore({("a", "worst:10"): _frame([1] * 8 + [0] * 2), ("b", "worst:10"): _frame([1] * 5 + [0] * 5)})
    results = [step_result(store, s, rows, ["worst:10"]) for s in steps]
    (found,) = transitions(results, ["worst:10"])
    assert (found.earlier, found.later) == ("a", "b")
    assert found.difference.difference == pytest.approx(-0.3)
    assert (found.difference.a_only, found.difference.b_only) == (0, 3)
    assert found.difference.p_value == pytest.approx(0.25)
    assert not found.difference.distinguishable  # p = 0.25: the interval holds 0
    table = transition_table([found])
    assert table.loc[0, "McNemar p"] == "0.25" and table.loc[0, "distinguishable"] == "no"


def test_study_refuses_images_that_differ_between_a_steps_rows():
    step = study_steps("hetpure")[3]
    rows = [_row(spec, f"k{i}") for i, spec in enumerate(step.specs)]
    shifted = _frame([1, 1, 0]).assign(index=[5, 6, 7])
    store = FakeStore({("k0", "vote:20"): _frame([1, 1, 0]), ("k1", "vote:20"): shifted, ("k2", "vote:20"): _frame([1, 1, 0])})
    with pytest.raises(Exception, match="not on the same images"):
        step_result(store, step, rows, ["vote:20"])


def test_study_without_a_store_is_a_one_line_error(tmp_path, capsys):
    code = main(["study", "protocol", "--defense", "hetpure", "--no-run", "--leaderboard-dir", str(tmp_path)])
    err = capsys.readouterr().err.strip()
    assert code == 2 and err.count("\n") == 0 and "no result store" in err


def test_staircase_figure_is_reproducible(tmp_path):
    from hetpure_bench.reporting.protocol_study import write_staircase

    steps = study_steps("diffpure")[:2]
    rows = [_row(steps[0].specs[0], "a"), _row(steps[1].specs[0], "b")]
    store = FakeStore({("a", "vote:20"): _frame([1, 1, 0, 1]), ("b", "vote:20"): _frame([1, 0, 0, 1])})
    results = [step_result(store, s, rows, ["vote:20"]) for s in steps]
    first = write_staircase("diffpure", results, ["vote:20"], tmp_path / "one.png").read_bytes()
    assert first == write_staircase("diffpure", results, ["vote:20"], tmp_path / "two.png").read_bytes()
    assert np.frombuffer(first[:8], np.uint8).tolist() == [137, 80, 78, 71, 13, 10, 26, 10]  # a PNG


@pytest.fixture(scope="module")
def tiny_reference_store(tmp_path_factory):
    """The cpu-reference preset's bare-classifier row on 4 generated images, 1-iteration attacks."""
    folder = tmp_path_factory.mktemp("reference")
    data = write_image_tar(folder / "images.tar", 8, "test")
    assert main(["run", "--preset", "cpu-reference", "--data", str(data), "--defense", "none", "-n", "4",
                 "--steps", "1", "--eot", "1", "--sanity-images", "0", "--batch-size", "4", "--leaderboard-dir", str(folder)]) == 0
    return folder / "results.sqlite"


def test_reference_report_is_regenerated_byte_for_byte(tiny_reference_store, tmp_path):
    def report(out):
        assert main(["report", "--name", "reference", "--store", str(tiny_reference_store), "--out", str(out)]) == 0
        return {p.name: p.read_bytes() for p in sorted((out / "reference").iterdir())}

    first, second = report(tmp_path / "one"), report(tmp_path / "two")
    assert first == second and {"report.md", "protocol-hetpure.png", "protocol-diffpure.png"} <= set(first)
    text = first["report.md"].decode()
    summary = text.split("## Summary\n\n", 1)[1].split("\n\n", 1)[0].splitlines()
    assert len(summary) == 5 and summary[0].startswith("1. Setup:") and "Linf eps 8/255" in summary[0]
    assert "(not yet run to the end): diffpure, hetpure, " in summary[4] and ", hetpure-randmask. " in summary[4]  # the preset's rows
    headline = text.split("## Headline", 1)[1].split("## Protocol", 1)[0]
    assert "| none |" in headline and "| 0 |" in headline  # the bare classifier: NFE 0
    threads = torch.get_num_threads()  # the seconds per image are labelled with the process's threads
    device = f"cpu ({threads} thread{'s' if threads != 1 else ''})"
    assert f"| {device} |" in headline and f"measured on {device};" in summary[0]  # not an assumed machine
    cost = text.split("## Cost per setup\n", 1)[1].split("## ", 1)[0]
    assert "| none | suite(" in cost and "Total over 1 setup: " in cost  # the spent hours, per setup and in all
    assert "missing: hetpure pgd-eot (surrogate:2)" in text  # pending steps are named, not dropped


def test_summary_compares_the_authors_protocol_with_the_strongest_later_step():
    from hetpure_bench.reporting.reference_report import _inflation_line

    steps = study_steps("diffpure")[:3]
    rows = [_row(step.specs[0], key) for step, key in zip(steps, "abc")]
    # (b) is the strongest (lowest) step, (c) the last one: the summary must name (b).
    store = FakeStore({("a", "vote:20"): _frame([1, 1, 1, 1]), ("b", "vote:20"): _frame([0, 0, 1, 1]),
                       ("c", "vote:20"): _frame([1, 1, 1, 0])})
    line = _inflation_line("diffpure", [step_result(store, s, rows, ["vote:20"]) for s in steps])
    assert "step (b) gives 50.0" in line and "(b) vs (a)" in line


def test_report_draws_the_image_grid_of_the_preset_when_asked(tiny_reference_store, tmp_path):
    data = write_image_tar(tmp_path / "images.tar", 128, "test")  # the preset's 128 images
    assert main(["report", "--name", "reference", "--store", str(tiny_reference_store), "--out", str(tmp_path),
                 "--images", "1", "--data", str(data), "--preset", "cpu-reference", "--image-defenses", "none"]) == 0
    assert (tmp_path / "reference" / "images.png").read_bytes()[:4] == b"\x89PNG"
    assert "](images.png)" in (tmp_path / "reference" / "report.md").read_text()


class FakeSetupStore(FakeStore):
    """FakeStore plus what the leaderboard's worst case reads: every row on the same images."""

    def setup(self, key: str) -> dict:
        return {"image_indices_sha256": "same images"}


def _suite_and_pgd_rows() -> list[dict]:
    base = {"preset": "cpu-reference", "defense": "hetpure", "defense_config": "c", "classifier": "m",
            "diffusion_model": "d", "data_source": "cifar10-jpeg", "threat": "Linf", "eps": "0.0313725",
            "evaluation": "expected:10", "n_images": 4, "seed": 0, "sanity": "ok", "converged": "yes", "nfe": 10,
            "wall_s": 8.0, "device": "cpu (2 threads)", "clean_acc": 1.0, "clean_ci": [0.5, 1.0],
            "interval_method": "bootstrap 95%"}
    return [{**base, "attack": "suite(A + B)", "gradient_mode": "full", "setup_hash": "suite", "robust_acc": 0.75,
             "robust_ci": [0.25, 1.0]},
            {**base, "attack": "PGD-EOT(Linf, 10 steps, EOT 2)", "gradient_mode": "full", "setup_hash": "pgd",
             "robust_acc": 0.75, "robust_ci": [0.25, 1.0], "converged": "no"}]


def test_the_reference_report_also_shows_the_worst_case_over_every_attack_run():
    from hetpure_bench.reporting.reference_report import headline_table, strongest_table

    rows = _suite_and_pgd_rows()
    store = FakeSetupStore({("suite", "expected:10"): _frame([1, 1, 0, 1]), ("pgd", "expected:10"): _frame([0, 1, 1, 1])})
    assert headline_table(rows)["robust expected:10"].tolist() == ["75.0 [25.0, 100.0]"]  # the suite alone
    strongest = strongest_table(rows, store).iloc[0]
    assert strongest["defense"] == "hetpure" and strongest["robust expected:10"].startswith("50.0 [")  # images 0 and 2 fall
    assert strongest["robust vote:20"] == "pending" and strongest["rows combined"] == 2
    assert strongest["converged"] == "PGD-EOT(Linf, 10 steps, EOT 2) (full): no"


def test_the_summary_does_not_rank_worst_cases_over_different_numbers_of_attacks():
    from hetpure_bench.reporting.reference_report import ranking_line

    suite = [{"defense": "a", "robust expected:10": "30.0 [25.0, 35.0]"}, {"defense": "b", "robust expected:10": "29.0 [24.0, 34.0]"}]
    worst = [{"defense": "b", "robust expected:10": "29.0 [24.0, 34.0]", "rows combined": 1},
             {"defense": "a", "robust expected:10": "26.0 [21.0, 31.0]", "rows combined": 6}]
    line = ranking_line(suite, worst)
    assert "a 30.0 [25.0, 35.0]; b 29.0" in line and "b 29.0 [24.0, 34.0] (1 row); a 26.0 [21.0, 31.0] (6 rows)" in line
    assert "not a ranking" in line
    assert "not a ranking" not in ranking_line(suite, [{**r, "rows combined": 1} for r in worst])
    assert ranking_line([], worst) == "No defense has finished its suite row yet."
