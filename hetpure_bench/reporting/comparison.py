"""Paired comparisons of rows measured on the same images: ``compare ROW_A ROW_B`` and the
report's comparison section.

Two rows are on the same images when their setups have the same data source and the same
image indices (``image_indices_sha256``); their per-image outcomes (the result store's records)
are then paired image by image (statistics.paired_difference).
"""

from __future__ import annotations

import re
from dataclasses import dataclass

import numpy as np
import pandas as pd

from ..bench.statistics import Interval, PairedDifference, accuracy_interval, paired_difference
from ..bench.store import ResultStore
from ..errors import UserError
from .leaderboard import SETUP_COLUMNS, latest_rows

MIN_HASH_PREFIX = 6
# Setup entries that are not labels of a row (the row has its own evaluation mode).
_NOT_LABELS = ("evaluation_modes",)


def distinct_settings(config: str, configs: list[str]) -> str:
    """The settings ("key=value" words) of a defense configuration that not every one of
    ``configs`` has: what tells it apart from them."""
    return " ".join(s for s in str(config).split(" ") if any(s not in str(c).split(" ") for c in configs))


# --- naming rows ---
def _split_labels(text: str, columns: set[str]) -> dict[str, str]:
    """ "defense=hetpure,attack=PGD-EOT(Linf, 10 steps, EOT 2)" -> {defense: ..., attack: ...}:
    a comma separates two labels only where a column name and "=" follow it, since values such
    as attack labels and defense configurations contain commas and "=" themselves."""
    names = "|".join(re.escape(c) for c in sorted(columns, key=len, reverse=True))
    labels = {}
    for part in re.split(rf",\s*(?=(?:{names})=)", text.strip()):
        key, sep, value = part.partition("=")
        key = key.strip()
        if not sep or key not in columns:
            raise UserError(f"{part!r}: name a row by labels COLUMN=VALUE with columns among {', '.join(sorted(columns))}")
        labels[key] = value.strip()
    return labels


def _describe(rows: list[dict], shown: int = 10) -> str:
    """The first ``shown`` rows as hash:mode with the labels in which the rows differ (of a
    defense configuration, the settings not all of them share)."""
    keys = [k for k in SETUP_COLUMNS if len({str(r.get(k)) for r in rows}) > 1]
    configs = [r["defense_config"] for r in rows]

    def label(row: dict, key: str) -> str:
        return f"{key}={distinct_settings(row[key], configs) if key == 'defense_config' else row[key]}"

    described = [f"{r['setup_hash'][:12]}:{r['evaluation']}" + (f" ({', '.join(label(r, k) for k in keys)})" if keys else "")
                 for r in rows[:shown]]
    return "; ".join(described) + (f"; and {len(rows) - shown} more" if len(rows) > shown else "")


def _by_hash(rows: list[dict], text: str, mode: str | None) -> list[dict]:
    prefix, _, own_mode = text.partition(":")
    if len(prefix) < MIN_HASH_PREFIX or not re.fullmatch(r"[0-9a-fA-F]+", prefix):
        raise UserError(f"{text!r}: name a row by a setup hash prefix of >= {MIN_HASH_PREFIX} hex characters "
                        "(optionally :MODE) or by labels like defense=hetpure,evaluation=single")
    found = [r for r in rows if r["setup_hash"].startswith(prefix.lower())]
    if not found:
        raise UserError(f"no row's setup hash starts with {prefix!r}")
    if len({r["setup_hash"] for r in found}) > 1:
        raise UserError(f"setup hash prefix {prefix!r} is ambiguous; candidates: {_describe(found)}")
    mode = own_mode or mode
    if mode is not None:
        found = [r for r in found if r["evaluation"] == mode]
        if not found:
            raise UserError(f"setup {prefix} has no row for evaluation mode {mode!r}")
    if len(found) > 1:
        raise UserError(f"setup {prefix} has rows for several evaluation modes: add :MODE or --mode "
                        f"({', '.join(r['evaluation'] for r in found)})")
    return found


def _by_labels(rows: list[dict], text: str, mode: str | None) -> list[dict]:
    labels = _split_labels(text, set().union(*(r.keys() for r in rows)))
    if mode is not None:
        labels.setdefault("evaluation", mode)
    found = [r for r in rows if all(str(r.get(k)) == v for k, v in labels.items())]
    if not found:
        missing = [k for k, v in labels.items() if not any(str(r.get(k)) == v for r in rows)]
        hint = "; ".join(f"{k} in the store: {', '.join(sorted({str(r.get(k)) for r in rows}))}" for k in missing)
        raise UserError(f"no row has {text}" + (f" ({hint})" if hint else " (no row has all of these together)"))
    if len(found) > 1:
        raise UserError(f"{len(found)} rows have {text}; add labels or name one by setup hash: {_describe(found)}")
    return found


def find_row(rows: list[dict], name: str, mode: str | None = None) -> dict:
    """The one row (of the store's ``rows``) that ``name`` names: a setup hash prefix (>= 6 hex
    characters, ":MODE" when the setup has several evaluation modes) or labels
    "COLUMN=VALUE,COLUMN=VALUE" that exactly one row has. ``mode``: the evaluation mode when the
    name does not give one."""
    if not rows:
        raise UserError("the result store holds no finished rows")
    (row,) = _by_labels(rows, name, mode) if "=" in name else _by_hash(rows, name, mode)
    return row


# --- pairing ---
@dataclass(frozen=True)
class PairedRows:
    """Two rows on the same images: each one's accuracies with their intervals (from its
    per-image outcomes, keyed "clean" and "robust") and the paired differences a - b."""

    a: dict
    b: dict
    n: int
    a_accuracy: dict[str, Interval]
    b_accuracy: dict[str, Interval]
    clean: PairedDifference
    robust: PairedDifference


def image_set(store: ResultStore, row: dict) -> tuple[str, str] | None:
    """(data source, sha256 of the image indices) of a row's setup; None when not in the store."""
    setup = store.setup(row["setup_hash"])
    return (setup["data_source"], setup["image_indices_sha256"]) if setup else None


def _outcomes(store: ResultStore, row: dict) -> pd.DataFrame:
    frame = store.per_image(row["setup_hash"], row["evaluation"])
    if len(frame) != int(row["n_images"]):
        raise UserError(f"the store holds {len(frame)} of the {row['n_images']} per-image results of setup "
                        f"{row['setup_hash'][:12]}:{row['evaluation']}")
    return frame.set_index("index")


def pair(store: ResultStore, a: dict, b: dict) -> PairedRows:
    """Pair two rows image by image; refuses rows that are not on the same images."""
    images_a, images_b = image_set(store, a), image_set(store, b)
    if images_a is None or images_a != images_b:
        raise UserError(
            f"rows {a['setup_hash'][:12]} and {b['setup_hash'][:12]} are not on the same images "
            f"({a['data_source']}, {a['n_images']} images, indices {images_a[1][:12] if images_a else '?'} vs "
            f"{b['data_source']}, {b['n_images']} images, indices {images_b[1][:12] if images_b else '?'}): "
            "a paired comparison needs the same data source and image indices")
    frame_a = _outcomes(store, a)
    frame_b = _outcomes(store, b).loc[frame_a.index]  # the same images (equal index hashes), same order
    outcomes = {(letter, which): frame[f"{which}_correct"].to_numpy(np.float64)
                for letter, frame in (("a", frame_a), ("b", frame_b)) for which in ("clean", "robust")}
    accuracy = {letter: {which: accuracy_interval(outcomes[letter, which]) for which in ("clean", "robust")} for letter in "ab"}
    return PairedRows(a, b, len(frame_a), accuracy["a"], accuracy["b"],
                      paired_difference(outcomes["a", "clean"], outcomes["b", "clean"]),
                      paired_difference(outcomes["a", "robust"], outcomes["b", "robust"]))


# --- the compare command ---
def _labels(store: ResultStore, row: dict) -> dict:
    setup = store.setup(row["setup_hash"]) or {}
    return {**{k: v for k, v in setup.items() if k not in _NOT_LABELS}, "evaluation": row["evaluation"]}


def compare_text(store: ResultStore, name_a: str, name_b: str, mode: str | None = None) -> str:
    """What ``compare`` prints: the two rows' differing setup labels, their accuracies with
    intervals, and the paired differences (a - b) of clean and robust accuracy."""
    rows = store.rows()
    a, b = find_row(rows, name_a, mode), find_row(rows, name_b, mode)
    paired = pair(store, a, b)
    labels_a, labels_b = _labels(store, a), _labels(store, b)
    differing = [k for k in {**labels_a, **labels_b} if str(labels_a.get(k)) != str(labels_b.get(k))]
    configs = [labels_a.get("defense_config"), labels_b.get("defense_config")]
    lines = [f"same images: {a['data_source']}, {paired.n} images, seed {a['seed']} "
             f"(indices sha256 {image_set(store, a)[1][:12]})"]
    for letter, row, labels in (("A", a, labels_a), ("B", b, labels_b)):
        shown = {k: distinct_settings(labels[k], configs) if k == "defense_config" else labels[k] for k in differing}
        lines.append(f"{letter}: setup {row['setup_hash'][:12]}:{row['evaluation']}  "
                     + ("; ".join(f"{k}={v}" for k, v in shown.items()) or "the same setup"))
    for letter, accuracy in (("A", paired.a_accuracy), ("B", paired.b_accuracy)):
        lines.append(f"{letter}: clean {accuracy['clean'].as_percent()}  robust {accuracy['robust'].as_percent()}  "
                     f"({accuracy['robust'].method})")
    for which in ("clean", "robust"):
        difference = getattr(paired, which)
        lines.append(f"{which} accuracy: {difference.sentence('A', 'B')}")
    lines.append(f"(differences A - B in points, {paired.robust.method})")
    return "\n".join(lines)


# --- the report's section ---
def _short_configs(rows: list[dict]) -> dict[int, str]:
    """Per row (by id), its defense with what tells it apart from the other rows of the same
    defense: the configuration settings the others lack, and its diffusion model if theirs differ."""
    names = {}
    for row in rows:
        others = [r for r in rows if r["defense"] == row["defense"] and r is not row]
        own = distinct_settings(row["defense_config"], [o["defense_config"] for o in others])
        model = any(o["diffusion_model"] != row["diffusion_model"] for o in others)
        names[id(row)] = row["defense"] + (f" [{own}]" if own else "") + (f" + {row['diffusion_model']}" if model else "")
    return names


def _ranked(rows: list[dict], best: bool) -> dict:
    """The row with the highest (best) or lowest robust accuracy, ties broken by clean accuracy
    and then the labels, so that the choice does not depend on the store's order."""
    order = sorted(rows, key=lambda r: (r["robust_acc"], r["clean_acc"], r["defense_config"], r["attack"], r["gradient_mode"]))
    return order[-1] if best else order[0]


def _group(rows: list[dict], key) -> list[list[dict]]:
    groups: dict[tuple, list[dict]] = {}
    for row in rows:
        groups.setdefault(key(row), []).append(row)
    return [groups[k] for k in sorted(groups, key=lambda k: tuple(map(str, k)))]


def _robust_accuracy(store: ResultStore, row: dict) -> Interval:
    return accuracy_interval(_outcomes(store, row)["robust_correct"].to_numpy(np.float64))


def _sentence(store: ResultStore, row: dict, reference: dict, name: str, reference_name: str) -> str:
    return f"- {pair(store, row, reference).robust.sentence(name, reference_name)}"


def _defense_lines(store: ResultStore, rows: list[dict], images) -> list[str]:
    """Each defense against diffpure and none under the same attack, on the same images."""
    lines = []
    key = lambda r: (*images[id(r)], r["classifier"], r["threat"], r["eps"], r["attack"],  # noqa: E731
                     r["gradient_mode"], r["evaluation"])
    for group in _group(rows, key):
        names = _short_configs(group)
        bullets = []
        for baseline in ("diffpure", "none"):
            candidates = [r for r in group if r["defense"] == baseline]
            if not candidates:
                continue
            # Of several configurations of the baseline, the most robust one: the one to beat.
            reference = _ranked(candidates, best=True)
            # none vs diffpure is written once, as diffpure vs none.
            compared = [r for r in group if r["defense"] not in (baseline, "none")]
            for row in sorted(compared, key=lambda r: names[id(r)]):
                bullets.append(_sentence(store, row, reference, names[id(row)], names[id(reference)]))
        if bullets:
            first = group[0]
            lines += [f"**{first['attack']}, gradient {first['gradient_mode']}, evaluation {first['evaluation']}** "
                      f"({first['classifier']}; {first['data_source']}, {first['n_images']} images, seed {first['seed']}):\n",
                      *bullets, ""]
    return lines


def _attack_lines(store: ResultStore, rows: list[dict], images) -> list[str]:
    """Each attack (and gradient mode) against the strongest one on the same defense."""
    lines = []
    key = lambda r: (*images[id(r)], r["defense"], r["defense_config"], r["classifier"], r["diffusion_model"],  # noqa: E731
                     r["threat"], r["eps"], r["evaluation"])
    for group in _group(rows, key):
        if len(group) < 2:
            continue
        trusted = [r for r in group if r["sanity"] in ("ok", "not run")] or group
        strongest = _ranked(trusted, best=False)
        name = lambda r: f"{r['attack']} (gradient {r['gradient_mode']})"  # noqa: E731
        others = sorted((r for r in group if r is not strongest), key=name)
        # The configuration settings that tell this defense configuration from its others here.
        own = distinct_settings(strongest["defense_config"],
                                [r["defense_config"] for r in rows if r["defense"] == strongest["defense"]])
        lines += [f"**{strongest['defense']}{f' [{own}]' if own else ''} + {strongest['diffusion_model']}, evaluation "
                  f"{strongest['evaluation']}** ({strongest['classifier']}; {strongest['data_source']}, "
                  f"{strongest['n_images']} images, seed {strongest['seed']}); strongest: {name(strongest)}, "
                  f"robust {_robust_accuracy(store, strongest).as_percent()}:\n",
                  *(_sentence(store, r, strongest, name(r), "the strongest") for r in others), ""]
    return lines


def report_section(rows: list[dict], store: ResultStore) -> str:
    """The report's "Paired comparisons" section (Markdown), from the store's rows (oldest
    first; of rows with the same labels the newest counts) and their per-image results."""
    latest = [r for data, threat in sorted({(r["data_source"], r["threat"]) for r in rows})
              for r in latest_rows(rows, data, threat)]
    images = {id(r): image_set(store, r) for r in latest}
    latest = [r for r in latest if images[id(r)] is not None]
    parts = [
        "## Paired comparisons\n",
        "Differences of robust accuracy between rows measured on the same images (same data source and "
        "image indices), image by image: the difference in points with its paired bootstrap 95% interval "
        "over images (seeded) and, for 0/1 outcomes, the exact McNemar test on the images where exactly one "
        "of the two rows is right. A difference whose interval contains 0 reads \"not distinguishable at "
        "n = ...\".\n",
        "### Each defense vs diffpure and vs none, under the same attack\n",
        "Same images, classifier, attack, gradient mode and evaluation mode; of several configurations of "
        "diffpure (or none) on those images, the most robust one is the reference.\n",
        *(_defense_lines(store, latest, images) or ["(no such pairs in the store)\n"]),
        "### Each attack vs the strongest attack on the same defense\n",
        "Same images, defense configuration, classifier, diffusion model and evaluation mode; the strongest "
        "attack is the one with the lowest robust accuracy among the rows whose sanity checks did not fail.\n",
        *(_attack_lines(store, latest, images) or ["(no defense has two attacks on the same images)\n"]),
    ]
    return "\n".join(parts)
