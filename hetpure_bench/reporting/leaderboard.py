"""Leaderboard files, generated from the result store, per data source and threat model: a headline
(each defense setup once, at its per-image worst case over every attack run on the same images)
followed by every row, grouped by defense."""

from __future__ import annotations

import json
from pathlib import Path

import pandas as pd

from ..atomic import write_text_atomic
from ..bench.statistics import Interval, accuracy_interval
from ..bench.store import ResultStore
from .tables import robustbench_entry

# Every setup label of a row (DEVELOPERS.md): a row is identified by all of them together.
SETUP_COLUMNS = [
    "defense", "defense_config", "classifier", "diffusion_model", "data_source", "threat", "eps",
    "attack", "gradient_mode", "evaluation", "n_images", "seed", "eval_seed",
]
# 95% intervals over images as fractions; empty for rows stored before rows carried intervals.
INTERVAL_COLUMNS = ["clean_ci_low", "clean_ci_high", "robust_ci_low", "robust_ci_high", "interval_method"]
ACCURACY_COLUMNS = ["clean_acc", "clean_ci_low", "clean_ci_high", "robust_acc", "robust_ci_low", "robust_ci_high",
                    "interval_method"]
# DiffHammer's own N-evaluation (n_evaluation.py), "-" for rows without DiffHammer.
N_EVALUATION_COLUMNS = ["diffhammer_avg", "diffhammer_wor"]
RESULT_COLUMNS = ACCURACY_COLUMNS + ["robust_by_attack"] + N_EVALUATION_COLUMNS + ["sanity", "converged"]
# What a row cost (measured, so never identical between two runs of the same setup).
COST_COLUMNS = ["nfe", "wall_s", "attack_s_by_attack", "images_per_s", "peak_mem_mib", "device"]
COLUMNS = SETUP_COLUMNS + RESULT_COLUMNS + COST_COLUMNS

# A headline row: one defense setup on one set of images, combining every attack row run on them.
HEADLINE_SETUP = ["defense", "defense_config", "classifier", "diffusion_model", "evaluation", "eps"]
HEADLINE_COLUMNS = (["defense", "defense_config", "classifier", "diffusion_model", "data_source", "threat", "eps",
                     "evaluation", "n_images", "seed"] + ACCURACY_COLUMNS + ["n_rows", "attacks", "sanity", "converged", "notes"])


def setup_key(row: dict) -> str:
    """All setup labels of a row joined: equal keys mean the same setup."""
    return "|".join(str(cell(row, column)) for column in SETUP_COLUMNS)


# Columns newer than some stored rows, and what those rows show in them.
LATER_COLUMNS = {"converged": "n/a", "attack_s_by_attack": "-", "diffhammer_avg": "-", "diffhammer_wor": "-"}


def cell(row: dict, column: str):
    """A row's value in a column; rows stored before evaluation seeds existed used the run's seed,
    rows stored before a LATER_COLUMNS column existed show its placeholder ("n/a", "-")."""
    if column == "eval_seed":
        return row.get("eval_seed", row["seed"])
    return row.get(column, LATER_COLUMNS[column]) if column in LATER_COLUMNS else row[column]


def counted(n: int, noun: str) -> str:
    """``n`` with its noun in the right number ("1 row", "2 rows")."""
    return f"{n} {noun}{'s' if n != 1 else ''}"


def leaderboard_stem(data_source: str, threat: str) -> str:
    return f"{data_source}-{threat}"


def latest_rows(rows: list[dict], data_source: str, threat: str) -> list[dict]:
    """The rows of one data source and threat model; of rows with the same labels (a setup rerun
    with, e.g., another batch size) the newest one (``rows`` are oldest first)."""
    return list({setup_key(r): r for r in rows if r["data_source"] == data_source and r["threat"] == threat}.values())


def interval_columns(row: dict) -> dict:
    """A row's ``clean_ci``/``robust_ci`` ([low, high] fractions) as low/high columns; None
    where the row predates them."""
    clean, robust = row.get("clean_ci") or (None, None), row.get("robust_ci") or (None, None)
    return {"clean_ci_low": clean[0], "clean_ci_high": clean[1], "robust_ci_low": robust[0],
            "robust_ci_high": robust[1], "interval_method": row.get("interval_method")}


def _table(rows: list[dict]) -> pd.DataFrame:
    return pd.DataFrame([{c: cell({**r, **interval_columns(r)}, c) for c in COLUMNS} for r in rows], columns=COLUMNS)


def leaderboard_table(rows: list[dict], data_source: str, threat: str) -> pd.DataFrame:
    """latest_rows as a table, best robust accuracy first."""
    table = _table(latest_rows(rows, data_source, threat))
    return table.sort_values(["robust_acc", "clean_acc"], ascending=False, kind="stable", ignore_index=True)


def grouped_by_defense(latest: list[dict]) -> pd.DataFrame:
    """Every row, defenses in alphabetical order, within a defense the strongest attack (lowest
    robust accuracy) first."""
    table = _table(latest)
    return table.sort_values(["defense", "robust_acc", "clean_acc"], kind="stable", ignore_index=True)


def _attack_name(row: dict) -> str:
    return f"{row['attack']} ({row['gradient_mode']})"


def _agreed(rows: list[dict], column: str, good: str) -> str:
    """One value when every combined row has it (sanity "ok", "not run"; converged "yes", "n/a");
    else each row whose value is not ``good``, with it."""
    values = {cell(r, column) for r in rows}
    if len(values) == 1:
        return values.pop()
    return "; ".join(f"{_attack_name(r)}: {cell(r, column)}" for r in rows if cell(r, column) != good)


def worst_case(rows: list[dict], frames: list[pd.DataFrame]) -> dict | None:
    """The headline row of one defense setup on one set of images: per image, the worst outcome
    over ``rows`` (their per-image records ``frames``, in the same order), i.e. robust only if
    robust in every row (0/1 outcomes), the minimum fraction for expected:K. Rows without per-image
    records are named in ``notes`` and not combined; None when no row has records."""
    combined = sorted(((r, f.set_index("index")) for r, f in zip(rows, frames) if not f.empty),
                      key=lambda pair: (pair[0]["robust_acc"], _attack_name(pair[0])))
    if not combined:
        return None
    order = combined[0][1].index  # the run's image order
    robust = pd.concat([f["robust_correct"].reindex(order).astype(float) for _, f in combined], axis=1)
    clean = pd.concat([f["clean_correct"].reindex(order).astype(float) for _, f in combined], axis=1)
    notes = []
    if (clean.nunique(axis=1) > 1).any():  # another evaluation noise (seed, device): judge each image by its worst
        notes.append("clean outcomes differ between the rows: per-image minimum")
    missing = [_attack_name(r) for r, f in zip(rows, frames) if f.empty]
    if missing:
        notes.append("not combined (no per-image records in the store): " + "; ".join(missing))
    clean_ci, robust_ci = accuracy_interval(clean.min(axis=1)), accuracy_interval(robust.min(axis=1))
    used = [r for r, _ in combined]
    first = used[0]
    return {
        **{k: first[k] for k in ("defense", "defense_config", "classifier", "diffusion_model", "data_source", "threat",
                                 "eps", "evaluation")},
        "n_images": len(order),
        "seed": "/".join(sorted({str(r["seed"]) for r in used})),
        **_interval_fields("clean", clean_ci), **_interval_fields("robust", robust_ci),
        "interval_method": robust_ci.method,
        "n_rows": len(used),
        "attacks": "; ".join(_attack_name(r) for r in used),
        "sanity": _agreed(used, "sanity", "ok"),
        "converged": _agreed(used, "converged", "yes"),
        "notes": "; ".join(notes) or "-",
    }


def _interval_fields(name: str, interval: Interval) -> dict:
    return {f"{name}_acc": interval.value, f"{name}_ci_low": interval.low, f"{name}_ci_high": interval.high}


def headline(latest: list[dict], store: ResultStore) -> pd.DataFrame:
    """One row per defense setup (HEADLINE_SETUP) and set of images (data source and the setup's
    image_indices_sha256): its worst case over every attack and gradient mode run on them, best
    robust accuracy first."""
    groups: dict[tuple, list[dict]] = {}
    for row in latest:
        images = (store.setup(row["setup_hash"]) or {}).get("image_indices_sha256", row["setup_hash"])  # unknown: alone
        groups.setdefault(tuple(str(row[k]) for k in HEADLINE_SETUP) + (row["data_source"], images), []).append(row)
    found = [worst_case(group, [store.per_image(r["setup_hash"], r["evaluation"]) for r in group])
             for group in groups.values()]
    table = pd.DataFrame([h for h in found if h], columns=HEADLINE_COLUMNS)
    return table.sort_values(["robust_acc", "clean_acc"], ascending=False, kind="stable", ignore_index=True)


def write_leaderboards(store: ResultStore, directory: Path) -> list[Path]:
    """``directory/<data>-<threat>.csv`` (every row), ``.headline.csv``, ``.md`` (both) and
    ``.robustbench.json`` (RobustBench model_info entries, one per row) for every data source
    and threat model in the store, each written atomically; returns the ``.csv`` paths."""
    rows = store.rows()
    written = []
    for data_source, threat in sorted({(r["data_source"], r["threat"]) for r in rows}):
        latest = latest_rows(rows, data_source, threat)
        table, top = grouped_by_defense(latest), headline(latest, store)
        csv_path = Path(directory) / f"{leaderboard_stem(data_source, threat)}.csv"
        write_text_atomic(csv_path, table.to_csv(index=False))
        write_text_atomic(csv_path.with_suffix(".headline.csv"), top.to_csv(index=False))
        write_text_atomic(csv_path.with_suffix(".md"), to_markdown(top, table, csv_path.stem))
        entries = [robustbench_entry(r) for r in latest]
        write_text_atomic(csv_path.with_suffix(".robustbench.json"), json.dumps(entries, indent=1) + "\n")
        written.append(csv_path)
    return written


def markdown_table(frame: pd.DataFrame) -> str:
    """A table in Markdown; missing values as "-", and "|" inside a cell as "/"."""
    if frame.empty:
        return "(none)\n"
    header = "| " + " | ".join(frame.columns) + " |\n|" + "---|" * len(frame.columns) + "\n"
    body = "\n".join("| " + " | ".join(_cell(v) for v in record) + " |" for record in frame.itertuples(index=False))
    return header + body + "\n"


def _cell(value) -> str:
    if value is None or (isinstance(value, float) and pd.isna(value)):
        return "-"
    return str(value).replace("|", "/")


HEADLINE_NOTE = (
    "Each defense setup (defense, configuration, classifier, diffusion model, evaluation mode, eps) "
    "once per set of images (same data source and image indices), at its **per-image worst case over "
    "every attack and gradient mode run on those images**: an image counts as robust only if it is "
    "robust in every one of those rows (RobustBench-style robust accuracy). `attacks` names the "
    "`n_rows` rows combined (attack and gradient mode), strongest first. For expected:K rows the "
    "per-image minimum of the rows' fractions is taken: an upper bound of the true worst case per "
    "purification pass (the passes of different rows are not paired). Best robust accuracy first. "
    "A sanity cell other than 'ok' names combined rows whose sanity checks failed or did not run: "
    "gradient masking may have weakened those attacks, so the worst case may be too high; a converged "
    "cell other than 'yes' names rows whose attack had not converged ('no') or recorded no history ('n/a').\n\n"
)

ROWS_NOTE = (
    "Each row's setup is spelled out in its columns; rows with different data, attack, gradient "
    "mode or evaluation mode are not comparable. Grouped by defense (alphabetical), within a defense "
    "the strongest attack (lowest robust accuracy) first. robust_acc is the per-image worst case over "
    "the attacks of a row (robust_by_attack lists each one's own). diffhammer_avg and diffhammer_wor "
    "(in %, with their 95% intervals; '-' for rows without DiffHammer) are DiffHammer's own N-evaluation, "
    "made while attacking under the attack's noise (N purifications of every iterate it evaluated): "
    "'Avg' counts an image by 1 - the highest fraction of misclassified purifications of one iterate, "
    "'Wor' as robust only if no purification of any iterate was misclassified; robust_acc is the "
    "returned example judged again under fresh evaluation noise. A row whose sanity cell is not 'ok' "
    "failed a sanity check (gradient masking or a broken evaluation is possible): do not trust its "
    "robust accuracy. converged: 'yes' when the robust count of each attack's own check moved by at "
    "most one image over its last 25% of iterations, 'no' otherwise (more iterations may lower robust "
    "accuracy), 'n/a' for attacks that record no history. Cost: nfe = diffusion-network calls per "
    "purification; wall_s = seconds of attack + evaluation summed over batches (sanity checks "
    "excluded); attack_s_by_attack = each attack's own seconds summed over batches (what each member "
    "of a suite cost; '-' for rows stored before attacks were timed one by one); peak_mem_mib = peak "
    "process RSS on CPU, max allocated on CUDA.\n\n"
)


def to_markdown(top: pd.DataFrame, table: pd.DataFrame, title: str) -> str:
    intervals = (
        "Accuracies in %, each with its 95% interval over images [low, high] (`interval_method`: Wilson "
        "score for 0/1 per-image outcomes, seeded bootstrap over images for expected:K fractions); '-' "
        "where a row was stored without one. The CSV files hold the same numbers as fractions "
        f"(`{title}.headline.csv`, `{title}.csv`).\n\n"
    )
    parts = [f"# Leaderboard: {title}\n\n{intervals}## Headline: worst case over every attack\n\n{HEADLINE_NOTE}",
             markdown_table(_formatted(top)), f"\n## All rows, grouped by defense\n\n{ROWS_NOTE}"]
    for defense, group in table.groupby("defense", sort=True):
        parts += [f"### {defense}\n\n", markdown_table(_formatted(group)), "\n"]
    return "".join(parts).rstrip("\n") + "\n"


def _formatted(table: pd.DataFrame) -> pd.DataFrame:
    """Cells as shown: accuracies with their intervals in %, the low/high columns folded in."""
    columns = [c for c in table.columns if c not in INTERVAL_COLUMNS or c == "interval_method"]
    records = table.to_dict("records")
    return pd.DataFrame({c: [_format(c, r) for r in records] for c in columns}, columns=columns)


def _format(column: str, record: dict) -> str:
    value = record[column]
    if column in ("clean_acc", "robust_acc"):
        name = column.split("_")[0]
        low, high = record[f"{name}_ci_low"], record[f"{name}_ci_high"]
        if low is None or pd.isna(low):
            return f"{100 * float(value):.1f} [-]"
        return Interval(float(value), float(low), float(high), "").as_percent()
    if column == "wall_s":
        return f"{float(value):.1f}"
    if column == "images_per_s":
        return f"{float(value):.3g}"
    return _cell(value)
