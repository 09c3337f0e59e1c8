"""Leaderboard files: one row per setup; a rerun of the same setup replaces its own row."""

from __future__ import annotations

from pathlib import Path

import pandas as pd

from .atomic import write_text_atomic

# Every setup label of a row (DEVELOPERS.md): a row is identified by all of them together.
SETUP_COLUMNS = [
    "defense", "defense_config", "classifier", "diffusion_model", "data_source", "threat", "eps",
    "attack", "gradient_mode", "evaluation", "n_images", "seed",
]
RESULT_COLUMNS = ["clean_acc", "robust_acc", "robust_by_attack", "nfe", "wall_s", "sanity"]
COLUMNS = SETUP_COLUMNS + RESULT_COLUMNS


def setup_key(row: dict) -> str:
    """All setup labels of a row joined: equal keys mean the same setup."""
    return "|".join(str(row[column]) for column in SETUP_COLUMNS)


def leaderboard_stem(data_source: str, threat: str) -> str:
    return f"{data_source}-{threat}"


def merge_row(directory: Path, row: dict) -> pd.DataFrame:
    """Merge ``row`` into ``directory/<data>-<threat>.csv`` and ``.md``; return the new table."""
    csv_path = Path(directory) / f"{leaderboard_stem(row['data_source'], row['threat'])}.csv"
    new = pd.DataFrame([{column: row[column] for column in COLUMNS}])
    if csv_path.exists():
        old = pd.read_csv(csv_path, dtype={c: str for c in SETUP_COLUMNS}, keep_default_na=False)
        old = old.reindex(columns=COLUMNS, fill_value="not recorded")  # files from older versions
        old = old[old.apply(setup_key, axis=1, result_type="reduce") != setup_key(row)]
        table = pd.concat([old, new.astype({c: str for c in SETUP_COLUMNS})], ignore_index=True)
    else:
        table = new
    table = table.sort_values(["robust_acc", "clean_acc"], ascending=False, kind="stable", ignore_index=True)
    write_text_atomic(csv_path, table.to_csv(index=False))
    write_text_atomic(csv_path.with_suffix(".md"), to_markdown(table, csv_path.stem))
    return table


def to_markdown(table: pd.DataFrame, title: str) -> str:
    header = "| " + " | ".join(COLUMNS) + " |\n|" + "---|" * len(COLUMNS) + "\n"
    lines = []
    for record in table.to_dict("records"):
        cells = [_format(column, record[column]) for column in COLUMNS]
        lines.append("| " + " | ".join(cells) + " |")
    note = (
        "Accuracies in %. Each row's setup is spelled out in its columns; rows with different "
        "data, attack, gradient mode or evaluation mode are not comparable. robust_acc is the "
        "per-image worst case over the attacks of a row (robust_by_attack lists each one's own). "
        "A row whose sanity cell is not 'ok' failed a sanity check (gradient masking or a broken "
        "evaluation is possible): do not trust its robust accuracy.\n\n"
    )
    return f"# Leaderboard: {title}\n\n{note}{header}" + "\n".join(lines) + "\n"


def _format(column: str, value) -> str:
    if column in ("clean_acc", "robust_acc"):
        return f"{100 * float(value):.1f}"
    if column == "wall_s":
        return f"{float(value):.1f}"
    return str(value).replace("|", "/")
