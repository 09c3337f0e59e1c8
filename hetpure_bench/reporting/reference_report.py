"""``report --name reference``: the CPU reference leaderboard (preset cpu-reference) as a person
reads it: a five-line summary and the headline table first, then the protocol study of hetpure
and diffpure, then the generic report (published vs measured, full leaderboard, comparisons)."""

from __future__ import annotations

from pathlib import Path

import pandas as pd

from ..bench.protocol_study import StepResult, step_result, study_modes, study_steps, transitions
from ..bench.spec import load_preset
from ..bench.statistics import Interval, paired_difference
from ..bench.store import ResultStore
from .accuracy_cells import accuracy_cell
from .leaderboard import cell, counted, headline, latest_rows, markdown_table
from .protocol_study import study_section, write_staircase
from .report import write_report

PRESET = "cpu-reference"
STUDY_DEFENSES = ("hetpure", "diffpure")
HEADLINE_MODES = ("vote:20", "expected:10", "worst:10")


def suite_rows(rows: list[dict]) -> dict[str, dict[str, dict]]:
    """defense -> mode -> its row under the preset's attack suite."""
    found: dict[str, dict[str, dict]] = {}
    for row in rows:
        if row["preset"] == PRESET and str(row["attack"]).startswith("suite(") and row["gradient_mode"] == "full":
            found.setdefault(row["defense"], {})[row["evaluation"]] = row
    return found


def _best_expected_first(by_defense: dict[str, dict[str, dict]]) -> list[tuple[str, dict[str, dict], dict]]:
    """(defense, mode -> row, its expected:10 row or else its first) in order of expected:10 robust
    accuracy, best first (defenses without expected:10 last)."""
    order = sorted(by_defense, key=lambda d: -float(by_defense[d].get("expected:10", {}).get("robust_acc", -1)))
    return [(d, by_defense[d], by_defense[d].get("expected:10") or next(iter(by_defense[d].values()))) for d in order]


def headline_table(rows: list[dict]) -> pd.DataFrame:
    """Defense, clean and robust accuracy under the suite per mode (with intervals), NFE, seconds
    per image (attack + evaluation) with the device and threads they were measured on, and
    convergence, best expected:10 robust first."""
    records = []
    for defense, modes, first in _best_expected_first(suite_rows(rows)):
        records.append({
            "defense": defense, "clean (expected:10)": accuracy_cell(first, "clean"),
            **{f"robust {m}": accuracy_cell(modes[m], "robust") if m in modes else "pending" for m in HEADLINE_MODES},
            "NFE": cell(first, "nfe"), "s / image": f"{float(first['wall_s']) / int(first['n_images']):.1f}",
            "device": cell(first, "device"),
            "converged": cell(first, "converged"),
        })
    return pd.DataFrame(records)


def strongest_table(rows: list[dict], store: ResultStore) -> pd.DataFrame:
    """Per defense of the preset: robust accuracy per mode at the per-image worst case over every
    attack and gradient mode run on its images (the leaderboard's headline), in headline order."""
    ours = [r for r in rows if r["preset"] == PRESET]
    by_defense: dict[str, dict[str, dict]] = {}
    for data_source, threat in sorted({(r["data_source"], r["threat"]) for r in ours}):
        for record in headline(latest_rows(ours, data_source, threat), store).to_dict("records"):
            by_defense.setdefault(record["defense"], {})[record["evaluation"]] = record

    def robust(record: dict | None) -> str:
        if record is None:
            return "pending"
        low, high = record["robust_ci_low"], record["robust_ci_high"]
        return Interval(record["robust_acc"], low, high, record["interval_method"]).as_percent()

    records = []
    for defense, modes, first in _best_expected_first(by_defense):
        records.append({"defense": defense, **{f"robust {m}": robust(modes.get(m)) for m in HEADLINE_MODES},
                        "rows combined": first["n_rows"], "attacks (strongest first)": first["attacks"],
                        "converged": first["converged"]})
    return pd.DataFrame(records)


def study_results(store: ResultStore, rows: list[dict], defense: str) -> tuple[list[StepResult], list[str]]:
    steps = study_steps(defense, PRESET)
    modes = study_modes(steps)
    return [step_result(store, step, rows, modes) for step in steps], modes


def _inflation_line(defense: str, results: list[StepResult]) -> str:
    """The authors' protocol against the strongest later step measured, under the authors' vote:20."""
    done = [r for r in results if "vote:20" in r.robust]
    if len(done) < 2 or done[0].step.key != "a":
        return f"{defense}: the protocol study is not complete yet (steps in the store: {', '.join(r.step.key for r in done) or 'none'})."
    last = min(done[1:], key=lambda r: r.robust["vote:20"].mean())  # the strongest later step (first on ties)
    diff = paired_difference(last.robust["vote:20"], done[0].robust["vote:20"])
    return (f"{defense}: the authors' protocol (a) gives {done[0].accuracy('vote:20').as_percent()} robust under "
            f"vote:20; step ({last.step.key}) gives {last.accuracy('vote:20').as_percent()}: "
            + diff.sentence(f"({last.step.key})", "(a)") + ".")


def ranking_line(suite: list[dict], strongest: list[dict]) -> str:
    """The defenses under the suite (headline_table records) and at their worst case over every
    attack run (strongest_table records); worst cases over different numbers of rows are bounds
    of different strength, and the line says so rather than invite a ranking."""
    if not suite:
        return "No defense has finished its suite row yet."
    names = {r["defense"] for r in suite}
    worst = [r for r in strongest if r["defense"] in names]
    unequal = len({r["rows combined"] for r in worst}) > 1
    return ("Under the attack suite (expected:10, robust % [95%]): " + "; ".join(
        f"{r['defense']} {r['robust expected:10']}" for r in suite) + "; at the per-image worst case over every attack "
        "run on the same images: " + "; ".join(
        f"{r['defense']} {r['robust expected:10']} ({counted(r['rows combined'], 'row')})" for r in worst)
        + (" (worst cases over different numbers of attacks: upper bounds of unequal strength, not a ranking)" if unequal else "") + ".")


def summary_lines(rows: list[dict], studies: dict[str, list[StepResult]], strongest: pd.DataFrame) -> list[str]:
    """Five lines: the setup, the defenses under the suite and at their worst case over every
    attack run (``strongest``: strongest_table), the two inflation findings, and what is missing
    or not converged."""
    table = headline_table(rows)
    records = table.to_dict("records")
    ours = sorted((r for r in rows if r["preset"] == PRESET), key=lambda r: r["diffusion_model"] == "-")
    first = ours[0] if ours else None
    setup = (f"Setup: {first['data_source']}, {first['n_images']} test images (seed {first['seed']}), {first['classifier']} + "
             f"{first['diffusion_model']}, {first['threat']} eps {round(float(first['eps']) * 255)}/255, measured on "
             f"{', '.join(sorted({d for r in ours for d in r['device'].split(' + ')}))}; numbers are "
             "not comparable with the published ones (other data, models and attack budgets; section Published vs measured)."
             if first else "Setup: no row of the cpu-reference preset in the store yet.")
    ranking = ranking_line(records, strongest.to_dict("records"))
    pending = [d for d in load_preset(PRESET)["defenses"] if d not in {r["defense"] for r in records}]
    late = [r["defense"] for r in records if r["converged"] == "no"]
    status = ("Pending suite rows of the preset's defenses (not yet run to the end): " + (", ".join(pending) or "none") + ". "
              + ("No suite row has finished yet." if not records else "Not converged (upper bounds): " + ", ".join(late) + "."
                 if late else "Every finished suite row converged."))
    return [setup, ranking, *(_inflation_line(d, studies[d]) for d in STUDY_DEFENSES), status]


def write_reference_report(rows: list[dict], out_dir: Path, store_label: str, store: ResultStore) -> Path:
    folder = Path(out_dir) / "reference"
    studies, sections = {}, []
    for defense in STUDY_DEFENSES:
        results, modes = study_results(store, rows, defense)
        studies[defense] = results
        figure = f"protocol-{defense}.png"
        write_staircase(defense, results, modes, folder / figure)
        sections.append(study_section(defense, results, transitions(results, modes), modes,
                                      f"Preset {PRESET}, the images of the headline table", figure))
    strongest = strongest_table(rows, store)
    head = [
        "## Summary\n",
        "\n".join(f"{k}. {line}" for k, line in enumerate(summary_lines(rows, studies, strongest), 1)) + "\n",
        "## Headline: every defense under the attack suite\n",
        "Robust accuracy in % [95% interval over images: Wilson for vote and worst, bootstrap for expected]; NFE: network "
        "calls per purification; s / image: attack + evaluation seconds per image of the expected:10 row on the device "
        "and intra-op threads in its column (a row whose batches ran under different settings lists each); "
        "converged: every member attack's robust count moved by at most one image over its last 25% of iterations.\n",
        markdown_table(headline_table(rows)),
        "### Strongest measured: the worst case over every attack run\n",
        "The suite is the preset's fixed attack; other rows of a defense (the protocol study's steps, the mask "
        "attacks) are attacks too. Per image, robust only if robust under every row run on the same images (any "
        "attack and gradient mode; for expected:10 the minimum of the rows' fractions, an upper bound of the per-pass "
        "worst case), as the leaderboard's headline. Where this is below the suite, the suite alone overstates "
        "robustness.\n",
        markdown_table(strongest),
    ]
    middle = [
        published_sentence(rows),
        "## Protocol inflation: how much each choice of the evaluation protocol moves robustness\n",
        *sections,
    ]
    return write_report(rows, "reference", Path(out_dir), store_label, store=store, head=head, middle=middle)


def published_sentence(rows: list[dict]) -> str:
    """What the side-by-side table supports, in words."""
    by_defense = suite_rows(rows)
    measured = "; ".join(f"{d} {by_defense[d]['vote:20']['robust_acc'] * 100:.1f}% under vote:20"
                         for d in STUDY_DEFENSES if "vote:20" in by_defense.get(d, {}))
    return ("What the data support: the published numbers (official CIFAR-10, 512 images, score_sde DDPM++, WRN "
            "classifiers, AutoAttack at EOT 20, 100-call grids) and this preset's (JPEG copy, 128 images, the embedded "
            "ResNet-18 and denoiser, 10-iteration attacks, 10-call grids) differ in every listed way, so no row here "
            "confirms or refutes a published number"
            + (f" (measured under the suite: {measured})" if measured else "")
            + ". What they can show is the direction and size of each protocol choice on one fixed setup: the next "
            "section.\n")
