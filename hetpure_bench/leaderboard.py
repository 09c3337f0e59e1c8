"""Leaderboard files, generated from the result store: one row per setup, per data source and
threat model."""

from __future__ import annotations

import json
from pathlib import Path

import pandas as pd

from .atomic import write_text_atomic
from .report_tables import robustbench_entry

# Every setup label of a row (DEVELOPERS.md): a row is identified by all of them together.
SETUP_COLUMNS = [
    "defense", "defense_config", "classifier", "diffusion_model", "data_source", "threat", "eps",
    "attack", "gradient_mode", "evaluation", "n_images", "seed",
]
RESULT_COLUMNS = ["clean_acc", "robust_acc", "robust_by_attack", "sanity"]
# What a row cost (measured, so never identical between two runs of the same setup).
COST_COLUMNS = ["nfe", "wall_s", "images_per_s", "peak_mem_mib", "device"]
COLUMNS = SETUP_COLUMNS + RESULT_COLUMNS + COST_COLUMNS


def setup_key(row: dict) -> str:
    """All setup labels of a row joined: equal keys mean the same setup."""
    return "|".join(str(row[column]) for column in SETUP_COLUMNS)


def leaderboard_stem(data_source: str, threat: str) -> str:
    return f"{data_source}-{threat}"


def latest_rows(rows: list[dict], data_source: str, threat: str) -> list[dict]:
    """The rows of one data source and threat model; of rows with the same labels (a setup rerun
    with, e.g., another batch size) the newest one (``rows`` are oldest first)."""
    return list({setup_key(r): r for r in rows if r["data_source"] == data_source and r["threat"] == threat}.values())


def leaderboard_table(rows: list[dict], data_source: str, threat: str) -> pd.DataFrame:
    """latest_rows as a table, best robust accuracy first."""
    return _ranked(latest_rows(rows, data_source, threat))


def _ranked(latest: list[dict]) -> pd.DataFrame:
    table = pd.DataFrame([{c: r[c] for c in COLUMNS} for r in latest], columns=COLUMNS)
    return table.sort_values(["robust_acc", "clean_acc"], ascending=False, kind="stable", ignore_index=True)


def write_leaderboards(rows: list[dict], directory: Path) -> list[Path]:
    """``directory/<data>-<threat>.csv``, ``.md`` and ``.robustbench.json`` (RobustBench model_info
    entries) for every data source and threat model in ``rows`` (the result store's rows, oldest
    first), each written atomically."""
    written = []
    for data_source, threat in sorted({(r["data_source"], r["threat"]) for r in rows}):
        latest = latest_rows(rows, data_source, threat)
        table = _ranked(latest)
        csv_path = Path(directory) / f"{leaderboard_stem(data_source, threat)}.csv"
        write_text_atomic(csv_path, table.to_csv(index=False))
        write_text_atomic(csv_path.with_suffix(".md"), to_markdown(table, csv_path.stem))
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


def to_markdown(table: pd.DataFrame, title: str) -> str:
    formatted = pd.DataFrame({column: [_format(column, v) for v in table[column]] for column in COLUMNS}, columns=COLUMNS)
    note = (
        "Accuracies in %. Each row's setup is spelled out in its columns; rows with different "
        "data, attack, gradient mode or evaluation mode are not comparable. robust_acc is the "
        "per-image worst case over the attacks of a row (robust_by_attack lists each one's own). "
        "A row whose sanity cell is not 'ok' failed a sanity check (gradient masking or a broken "
        "evaluation is possible): do not trust its robust accuracy. Cost: nfe = diffusion-network calls "
        "per purification; wall_s = seconds of attack + evaluation summed over batches (sanity checks "
        "excluded); peak_mem_mib = peak process RSS on CPU, max allocated on CUDA.\n\n"
    )
    return f"# Leaderboard: {title}\n\n{note}" + markdown_table(formatted)


def _format(column: str, value) -> str:
    if column in ("clean_acc", "robust_acc"):
        return f"{100 * float(value):.1f}"
    if column == "wall_s":
        return f"{float(value):.1f}"
    if column == "images_per_s":
        return f"{float(value):.3g}"
    return str(value)
