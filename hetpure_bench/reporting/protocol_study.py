"""The protocol-inflation study as a reader sees it: the staircase table (one row per step, one
column per evaluation mode), the adjacent steps' paired differences in plain sentences, and the
staircase figure."""

from __future__ import annotations

from pathlib import Path

import pandas as pd

from ..bench.protocol_study import StepResult, Transition
from .leaderboard import markdown_table
from .plots import staircase_plot


def staircase_table(results: list[StepResult], modes: list[str]) -> pd.DataFrame:
    """Robust accuracy (%) [95% interval] per step and mode; "pending" where a row is not stored."""
    records = []
    for result in results:
        record = {"step": f"({result.step.key})", "what changes": result.step.description}
        for mode in modes:
            accuracy = result.accuracy(mode)
            record[f"robust {mode}"] = accuracy.as_percent() if accuracy else "pending"
        record["converged"] = " / ".join(result.converged) if result.converged else "-"
        record["rows"] = " + ".join(result.attacks) if not result.missing else "missing: " + "; ".join(result.missing)
        records.append(record)
    return pd.DataFrame(records)


def transition_table(found: list[Transition]) -> pd.DataFrame:
    """Each adjacent pair of steps per mode: the paired difference with its interval and test."""
    return pd.DataFrame([{
        "from -> to": f"({t.earlier}) -> ({t.later})", "mode": t.mode,
        "difference (points) [95%]": f"{100 * t.difference.difference:+.1f} [{100 * t.difference.low:+.1f}, {100 * t.difference.high:+.1f}]",
        "McNemar p": "-" if t.difference.p_value is None else f"{t.difference.p_value:.3g}",
        "discordant (later only / earlier only)": "-" if t.difference.a_only is None else f"{t.difference.a_only} / {t.difference.b_only}",
        "distinguishable": "yes" if t.difference.distinguishable else "no",
    } for t in found])


def transition_sentences(found: list[Transition]) -> list[str]:
    """One sentence per transition: what moved robustness and by how much, or that it did not
    move distinguishably at this n."""
    return [f"- {t.mode}: " + t.difference.sentence(f"step ({t.later})", f"step ({t.earlier})") + "." for t in found]


def study_section(defense: str, results: list[StepResult], found: list[Transition], modes: list[str],
                  setup: str, figure: str | None = None) -> str:
    """The study's Markdown for one defense."""
    parts = [
        f"### Protocol study: {defense}\n",
        f"{setup}. Each step changes one choice; a step with several attacks counts an image robust only if it "
        "survives all of them. Accuracies in % with 95% intervals over images (Wilson for 0/1 outcomes, "
        "bootstrap for expected:K).\n",
        markdown_table(staircase_table(results, modes)),
        "Adjacent steps, image by image (later - earlier; exact McNemar test and its interval on the "
        "discordant images for 0/1 outcomes, paired bootstrap for expected:K):\n",
        markdown_table(transition_table(found)),
        "\n".join(transition_sentences(found)) + "\n" if found else "(no two adjacent steps are both in the store yet)\n",
    ]
    if figure:
        parts.append(f"![Protocol staircase: {defense}]({figure})\n")
    return "\n".join(parts)


def write_staircase(defense: str, results: list[StepResult], modes: list[str], path: Path) -> Path:
    return staircase_plot(defense, [(f"({r.step.key})", {m: r.accuracy(m) for m in modes}) for r in results], path)
