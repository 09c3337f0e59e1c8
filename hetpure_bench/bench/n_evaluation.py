"""DiffHammer's own N-evaluation (attacks/diffhammer.py) as row fields, from the stored histories.

DiffHammer judges every iterate it evaluates by N purifications drawn from the attack's noise
(those it computes for its gradient anyway). Per image, "Avg" success is the highest fraction of
misclassified purifications of one iterate, "Wor" whether any purification of any iterate (the
clean image's included) was misclassified; its robust accuracies are 1 - the mean of each. That
is the paper's evaluation, made while attacking. The row's robust_acc stays the benchmark's: the
returned example judged again under fresh evaluation noise. The two sit side by side, labelled,
and are never combined.
"""

from __future__ import annotations

import numpy as np

from ..attacks.base import Attack
from ..attacks.diffhammer import DiffHammer
from .statistics import accuracy_interval
from .stored_histories import decode


def n_evaluation_fields(histories: list[dict[int, bytes]], attacks: list[Attack]) -> dict:
    """``diffhammer_n_evaluation``: per DiffHammer attack of the row with a history in every
    batch (``histories``: per batch, attack index -> stored history), an entry (n_evaluation_entry);
    ``diffhammer_avg`` and ``diffhammer_wor``: those accuracies as cells (in %, with their
    intervals; "-" when there is none)."""
    entries = []
    for j, attack in enumerate(attacks):
        blobs = [batch.get(j) for batch in histories]
        if isinstance(attack, DiffHammer) and blobs and None not in blobs:
            fields = [decode(blob) for blob in blobs]
            # The last record holds every image: one a restart left out keeps its earlier values.
            avg = np.concatenate([f["avg"][-1] for f in fields])
            wor = np.concatenate([f["wor"][-1] for f in fields])
            entries.append(n_evaluation_entry(attack.name, attack.purifications, avg, wor))
    return {"diffhammer_n_evaluation": entries, "diffhammer_avg": _cells(entries, "avg"), "diffhammer_wor": _cells(entries, "wor")}


def n_evaluation_entry(name: str, purifications: int, avg: np.ndarray, wor: np.ndarray) -> dict:
    """One DiffHammer attack's N-evaluation over the row's images, from per image ``avg`` (the
    "Avg" success, a multiple of 1/N stored in float32) and ``wor`` (broken under "Wor"): the
    robust accuracies ``avg`` = mean of 1 - avg_i (fractional outcomes) and ``wor`` = the share
    of images never broken (0/1 outcomes), as fractions with their 95% intervals
    (statistics.accuracy_interval: Wilson for 0/1 outcomes, else the bootstrap over images)."""
    n = purifications
    survived = {"avg": 1 - np.round(np.asarray(avg, dtype=np.float64) * n) / n, "wor": ~np.asarray(wor, dtype=bool)}
    entry = {"attack": name, "purifications": n, "n_images": len(survived["wor"])}
    for key, outcomes in survived.items():
        interval = accuracy_interval(outcomes.astype(np.float64))
        entry.update({key: interval.value, f"{key}_ci": [interval.low, interval.high], f"{key}_interval_method": interval.method})
    return entry


def _percent(entry: dict, key: str) -> str:
    """ "84.4 [67.2, 93.1]" (%)."""
    low, high = entry[f"{key}_ci"]
    return f"{100 * entry[key]:.1f} [{100 * low:.1f}, {100 * high:.1f}]"


def _cells(entries: list[dict], key: str) -> str:
    """The leaderboard cell: the accuracy with its interval, each attack named when there are several."""
    if not entries:
        return "-"
    if len(entries) == 1:
        return _percent(entries[0], key)
    return "; ".join(f"{e['attack']} {_percent(e, key)}" for e in entries)


def n_evaluation_lines(row: dict) -> list[str]:
    """What `run` prints for a row with DiffHammer: one line per DiffHammer attack, labelled
    as its own evaluation, next to the row's re-evaluation."""
    return [
        f"{e['attack']}'s own N-evaluation (under the attack's noise, N = {e['purifications']} purifications of "
        f"every iterate it evaluated; robust %): Avg {_percent(e, 'avg')} ({e['avg_interval_method']}), "
        f"Wor {_percent(e, 'wor')} ({e['wor_interval_method']}); robust above is the returned example judged "
        "again under fresh evaluation noise"
        for e in row.get("diffhammer_n_evaluation") or []
    ]
