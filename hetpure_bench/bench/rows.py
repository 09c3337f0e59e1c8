"""A leaderboard row from a setup's stored results: accuracies with intervals, the attacks'
convergence evidence, DiffHammer's N-evaluation and what the row cost."""

from __future__ import annotations

import pandas as pd

from ..attacks.base import Attack
from ..attacks.convergence import combined_counts, converged, tail_change
from .n_evaluation import n_evaluation_fields
from .sanity import summarise
from .statistics import accuracy_interval
from .stored_histories import robust_counts


def make_row(setup: dict, mode: str, per_image: pd.DataFrame, costs: list[dict], checks: list[dict],
             sanity_wall: float, nfe: int, attacks: list[Attack], histories: list[dict[int, bytes]] = ()) -> dict:
    """One leaderboard row: the setup's labels, the accuracies, the attacks' convergence
    evidence and DiffHammer's own N-evaluation (from ``histories``: per batch, attack index ->
    stored history) and what the row cost."""
    # What this row would cost alone: the (shared) attack plus its own evaluation, summed over
    # batches (device-seconds: in a sharded run, the sum over the ranks).
    wall = sum(c["attack_s"] + c["eval_s"][mode] for c in costs)
    return {
        **{k: setup[k] for k in ("defense", "defense_config", "classifier", "diffusion_model", "data_source",
                                 "threat", "eps", "attack", "gradient_mode", "n_images", "seed", "preset")},
        "eval_seed": setup.get("eval_seed", setup["seed"]),
        "attack_reused": any("attack_reused_from" in c for c in costs),
        "evaluation": mode,
        **accuracy_fields(per_image),
        "robust_by_attack": robust_by_attack(per_image, attacks),
        **n_evaluation_fields(histories, attacks),
        "nfe": nfe,
        "wall_s": round(wall, 2),
        "attack_s_by_attack": attack_seconds(costs, attacks),
        "images_per_s": round(len(per_image) / wall, 4) if wall > 0 else float("nan"),
        "peak_mem_mib": round(max(c["peak_mib"] for c in costs)),
        "device": " + ".join(sorted({c["device"] for c in costs})),
        "sanity": summarise(checks) if checks else "not run",
        "sanity_checks": checks,
        "sanity_wall_s": round(sanity_wall, 1),
        **convergence_fields(histories, attacks, len(per_image)),
    }


def convergence_fields(histories: list[dict[int, bytes]], attacks: list[Attack], n_images: int) -> dict:
    """``convergence``: per attack with a history in every batch, its name, its robust counts per
    record summed over the batches (the attack's own noisy check; robust accuracy = count /
    n_images) and whether they converged (attacks/convergence.converged); ``converged``: "yes"
    when every such attack did, "no" when one did not, "n/a" when none has a history (attacks
    that record none, rows stored before histories were)."""
    entries = []
    for j, attack in enumerate(attacks):
        blobs = [batch.get(j) for batch in histories]
        if not blobs or None in blobs:
            continue
        counts = combined_counts([robust_counts(blob) for blob in blobs])
        entries.append({"attack": attack.name, "robust_counts": counts, "converged": converged(counts, n_images)})
    verdict = "n/a" if not entries else "yes" if all(e["converged"] for e in entries) else "no"
    return {"converged": verdict, "convergence": entries}


def attack_seconds(costs: list[dict], attacks: list[Attack]) -> str:
    """Each attack's seconds summed over the batches ("PGD-EOT(...) 12.3 s; ..."; they add up to
    about the batches' attack_s): what each member of a suite cost; "-" when a batch was stored
    without them (before attacks were timed one by one)."""
    per_batch = [c.get("attack_s_by_attack") for c in costs]
    if not per_batch or any(seconds is None or len(seconds) != len(attacks) for seconds in per_batch):
        return "-"
    return "; ".join(f"{a.name} {sum(seconds[j] for seconds in per_batch):.1f} s" for j, a in enumerate(attacks))


def convergence_warning(row: dict) -> str | None:
    """What `run` warns about a row that did not converge (None when it did or cannot say)."""
    if row.get("converged") != "no":
        return None
    late = [f"{e['attack']}'s robust count moved by {tail_change(e['robust_counts'])} images over the last 25% of "
            f"its {len(e['robust_counts'])} passes" for e in row["convergence"] if not e["converged"]]
    return f"not converged ({'; '.join(late)}; at most 1 expected): more iterations may lower robust accuracy"


def accuracy_fields(per_image: pd.DataFrame) -> dict:
    """clean_acc and robust_acc (means of the per-image outcomes) with their 95% intervals over
    the images as [low, high] fractions, and how the robust interval was made."""
    clean, robust = accuracy_interval(per_image["clean_correct"]), accuracy_interval(per_image["robust_correct"])
    return {
        "clean_acc": clean.value, "robust_acc": robust.value,
        "clean_ci": [clean.low, clean.high], "robust_ci": [robust.low, robust.high],
        "interval_method": robust.method,
    }


def robust_by_attack(per_image: pd.DataFrame, attacks: list[Attack]) -> str:
    """Each attack's own robust accuracy (%) with its 95% interval when a row has several ("-"
    otherwise); the row's robust_acc is the per-image worst case, never above the minimum of these."""
    if len(attacks) < 2:
        return "-"
    return "; ".join(f"{a.name} {accuracy_interval(per_image[f'robust_correct_{k}']).as_percent()}" for k, a in enumerate(attacks))
