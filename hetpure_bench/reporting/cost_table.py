"""What each finished setup of a result store took to compute, as spent: attack, evaluation and
sanity hours, wall hours and CPU core-hours (seconds times intra-op threads), and whether its
attacks converged. Read from the store's per-batch costs, not from the rows: a row's wall_s is
what that one evaluation mode would cost alone, and the modes of a setup share their passes."""

from __future__ import annotations

import re
from dataclasses import dataclass

import pandas as pd

from ..bench.store import ResultStore
from .leaderboard import cell, counted


@dataclass(frozen=True)
class SetupCost:
    """Seconds one setup spent; ``core_s`` None when a batch ran on a GPU (no core count)."""
    batches: int
    attack_s: float
    eval_s: float
    sanity_s: float
    core_s: float | None

    @property
    def wall_s(self) -> float:
        return self.attack_s + self.eval_s + self.sanity_s


def threads_of(device: str) -> int | None:
    """Intra-op threads of a CPU device label ("cpu (2 threads)" -> 2); None for a GPU."""
    found = re.fullmatch(r"cpu \((\d+) threads?\)", device)
    return int(found[1]) if found else None


def setup_cost(costs: list[dict], sanity_s: float) -> SetupCost:
    """A setup's spending from its batches' costs (runner.attack_and_judge): a batch that judged
    another setup's stored examples spent no attack seconds here (they count where they ran);
    evaluation is the batch's longest mode (the modes read their passes from one shared draw);
    the sanity checks ran at the last batch's threads."""
    attack = [0.0 if "attack_reused_from" in c else c["attack_s"] for c in costs]
    evaluation = [max(c["eval_s"].values()) for c in costs]
    threads = [threads_of(c["device"]) for c in costs]
    core = None if not costs or None in threads else (
        sum((a + e) * t for a, e, t in zip(attack, evaluation, threads)) + sanity_s * threads[-1])
    return SetupCost(len(costs), sum(attack), sum(evaluation), sanity_s, core)


def _hours(seconds: float | None) -> str:
    return "-" if seconds is None else f"{seconds / 3600:.2f}"


def cost_table(rows: list[dict], store: ResultStore, modes: tuple[str, ...]) -> tuple[pd.DataFrame, str]:
    """One line per finished setup of ``rows`` in the store's order, and the total in words;
    converged is given per mode of ``modes`` ("-" for a mode the setup has no row of)."""
    by_setup: dict[str, dict[str, dict]] = {}
    for row in rows:
        by_setup.setdefault(row["setup_hash"], {})[row["evaluation"]] = row
    records, spent = [], []
    for key, by_mode in by_setup.items():
        sanity = store.sanity(key)
        cost = setup_cost(store.batch_costs(key), sanity[1] if sanity else 0.0)
        spent.append(cost)
        first = next(iter(by_mode.values()))
        records.append({
            "defense": first["defense"], "attack": first["attack"], "gradient": first["gradient_mode"],
            "batches": cost.batches, "attack h": _hours(cost.attack_s), "evaluation h": _hours(cost.eval_s),
            "sanity h": _hours(cost.sanity_s), "wall h": _hours(cost.wall_s), "device": first["device"],
            "core-h": _hours(cost.core_s),
            f"converged ({' / '.join(modes)})": " / ".join(cell(by_mode[m], "converged") if m in by_mode else "-" for m in modes),
        })
    core = [c.core_s for c in spent if c.core_s is not None]
    total = (f"Total over {counted(len(spent), 'setup')}: {sum(c.wall_s for c in spent) / 3600:.2f} wall hours, "
             f"{sum(core) / 3600:.2f} CPU core-hours"
             + (f" ({len(spent) - len(core)} of them on a GPU, not in the core-hours)" if len(core) < len(spent) else "") + ".")
    return pd.DataFrame(records), total
