"""A row's accuracies with their stored 95% intervals, as tables and summary lines show them.

Rows (bench/rows.make_row) carry ``clean_ci`` and ``robust_ci`` as [low, high] fractions and
``interval_method``; rows stored before intervals were lack them and show "[-]".
"""

from __future__ import annotations

from ..bench.statistics import Interval


def row_interval(row: dict, which: str) -> Interval | None:
    """The row's ``which`` ("clean" or "robust") accuracy with its stored interval; None for
    rows written before intervals were stored."""
    ci = row.get(f"{which}_ci")
    if not ci:
        return None
    return Interval(float(row[f"{which}_acc"]), float(ci[0]), float(ci[1]), str(row.get("interval_method", "")))


def accuracy_cell(row: dict, which: str) -> str:
    """ "84.4 [67.2, 93.1]" (percent); "84.4 [-]" for a row without a stored interval."""
    interval = row_interval(row, which)
    return interval.as_percent() if interval else f"{100 * float(row[f'{which}_acc']):.1f} [-]"
