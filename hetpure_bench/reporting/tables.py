"""Tables generated from the result store's rows: published vs measured side by side, and
RobustBench-style model entries."""

from __future__ import annotations

import pandas as pd

from ..bench.evaluation import parse_evaluation_mode
from .accuracy_cells import accuracy_cell
from .published import PublishedResult

# What the published purification numbers were measured on (METHOD.md): a measured row matches
# the published setup only if it has all of these.
PUBLISHED_SETUP = {"data_source": "cifar10-official", "diffusion_model": "score-sde-ddpmpp", "n_images": 512}


def strongest_rows(rows: list[dict]) -> list[dict]:
    """Per defense and measured setup (classifier, diffusion model, data, threat, images, seed,
    evaluation mode), the row with the lowest robust accuracy among those whose sanity checks
    passed: the strongest attack that was run."""
    best: dict[tuple, dict] = {}
    for row in rows:
        if row["sanity"] != "ok":
            continue
        key = tuple(row[k] for k in ("defense", "defense_config", "classifier", "diffusion_model", "data_source",
                                     "threat", "eps", "n_images", "seed", "evaluation"))
        if key not in best or row["robust_acc"] < best[key]["robust_acc"]:
            best[key] = row
    return list(best.values())


def measured_setup(row: dict) -> str:
    return (f"{row['classifier']} + {row['diffusion_model']}; {row['data_source']}, {row['n_images']} images, "
            f"seed {row['seed']}; {row['attack']}, gradient {row['gradient_mode']}; evaluation {row['evaluation']}")


def differences(published: PublishedResult, row: dict) -> list[str]:
    """How a measured row's setup differs from the published one (empty: the same setup)."""
    found = [f"{k} {row[k]} (published: {v})" for k, v in PUBLISHED_SETUP.items() if str(row[k]) != str(v)]
    if row["classifier"] != published.classifier:
        found.append(f"classifier {row['classifier']} (published: {published.classifier})")
    if "AutoAttack" not in row["attack"]:
        found.append(f"attack {row['attack']} (published: {published.attack})")
    if row["evaluation"] != published.evaluation:
        found.append(f"evaluation {row['evaluation']} (published: {published.evaluation})")
    return found


def comparable_rows(published_mode: str, rows: list[dict]) -> list[dict]:
    """The measured rows to put next to a number published under ``published_mode``: those judged
    the same way, else those of the same kind with another count (vote:10 beside vote:20; for a
    one-shot number, "single", the expected:K rows, its unbiased estimate), else every row (its
    mode is then listed as a difference)."""
    kind = parse_evaluation_mode(published_mode)[0]
    kind = "expected" if kind == "single" else kind
    same = [r for r in rows if r["evaluation"] == published_mode] \
        or [r for r in rows if parse_evaluation_mode(r["evaluation"])[0] == kind]
    return same or rows


def side_by_side(published: list[PublishedResult], rows: list[dict]) -> pd.DataFrame:
    """One line per published purification result and strongest measured row of that method and
    threat model in a comparable evaluation mode (comparable_rows); `same setup` spells out every
    difference."""
    lines = []
    strongest = strongest_rows(rows)
    for entry in (p for p in published if p.kind == "purification"):
        matches = [r for r in strongest if r["defense"] == entry.method and r["threat"] == entry.threat]
        for row in sorted(comparable_rows(entry.evaluation, matches), key=lambda r: (r["evaluation"], r["classifier"])) or [None]:
            diff = differences(entry, row) if row else []
            lines.append({
                "method": entry.method,
                "published clean": "-" if entry.clean is None else entry.clean,  # robust-only sources
                "published robust": entry.robust,
                "published setup": f"{entry.classifier}; {entry.attack}; evaluation {entry.evaluation}; {entry.source}",
                "measured clean": accuracy_cell(row, "clean") if row else None,
                "measured robust": accuracy_cell(row, "robust") if row else None,
                "measured setup": measured_setup(row) if row else "not measured",
                "same setup": ("yes" if not diff else "NO: " + "; ".join(diff)) if row else "-",
            })
    return pd.DataFrame(lines)


def robustbench_entry(row: dict) -> dict:
    """A row in the fields of RobustBench's model_info JSON, plus this benchmark's setup labels
    (RobustBench's ``autoattack_acc`` is set only when the attack was AutoAttack)."""
    autoattack = "AutoAttack" in row["attack"]
    return {
        "name": f"{row['defense']} ({row['classifier']} + {row['diffusion_model']})",
        "link": "",
        "authors": "",
        "additional_data": False,
        "number_forward_passes": parse_evaluation_mode(row["evaluation"])[1],  # purifications per prediction
        "diffusion_calls_per_purification": row["nfe"],
        "dataset": "cifar10",
        "venue": "",
        "architecture": f"{row['classifier']} + {row['diffusion_model']}",
        "eps": row["eps"],
        "threat_model": row["threat"],
        "clean_acc": f"{100 * row['clean_acc']:.2f}",
        "reported": "",
        "autoattack_acc": f"{100 * row['robust_acc']:.2f}" if autoattack else "",
        "external": f"{100 * row['robust_acc']:.2f}",
        "footnote": (f"Measured by hetpure_bench: {measured_setup(row)}; defense config {row['defense_config']}; "
                     f"{interval_footnote(row)}; sanity {row['sanity']}."),
        "setup_hash": row["setup_hash"],
    }


def interval_footnote(row: dict) -> str:
    """ "intervals over 32 images (Wilson 95%): clean [67.2, 93.1]%, robust [15.6, 45.4]%", or
    a dash for rows stored before rows carried intervals."""
    if not row.get("clean_ci") or not row.get("robust_ci"):
        return "intervals -"
    (clean_low, clean_high), (robust_low, robust_high) = row["clean_ci"], row["robust_ci"]
    return (f"intervals over {row['n_images']} images ({row['interval_method']}): clean "
            f"[{100 * clean_low:.1f}, {100 * clean_high:.1f}]%, robust [{100 * robust_low:.1f}, {100 * robust_high:.1f}]%")
