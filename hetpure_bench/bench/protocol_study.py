"""The protocol-inflation study: how much each choice of the published evaluation protocol moves
a defense's reported robustness, one choice at a time, on the same images.

Steps (each a set of rows of one preset; a step with several rows counts an image robust only if
it survives every one of them, per evaluation mode):
  (a) the authors' protocol scaled to the preset: PGD-EOT on the 2-call surrogate (hetpure:
      detached mask and the reference stage rule, the defense defaults);
  (b) the same PGD-EOT with full gradients through the evaluated defense;
  (c) APGD-EOT with the CW margin loss, full gradients;
  (d) the attack suite (APGD-EOT margin and ce, DiffAttack), plus the mask-specific attacks
      where the defense has an attention mask (mask-avoiding, mask-aware annealed 0.5 -> 0.01).
Every step is judged by each of the preset's evaluation modes; adjacent steps are compared image
by image (statistics.paired_difference: exact McNemar and its interval for 0/1 outcomes).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from ..errors import UserError
from .spec import RunSpec, evaluation_modes, placeholder_defense, row_attack_label, spec_from_preset
from .statistics import Interval, PairedDifference, accuracy_interval, paired_difference
from .store import ResultStore

MASK_ATTACKS = ({"name": "mask-avoiding-apgd"}, {"name": "mask-aware-apgd", "anneal": [0.5, 0.01]})


@dataclass(frozen=True)
class Step:
    key: str
    description: str
    specs: tuple[RunSpec, ...]


def study_steps(defense: str, preset: str = "cpu-reference", **overrides) -> list[Step]:
    """The study's four steps for ``defense`` under ``preset`` (``overrides``: spec_from_preset's,
    e.g. data)."""
    def spec(attack: dict, gradient: str = "full") -> RunSpec:
        return spec_from_preset(preset, defense, attack=attack, gradient=gradient, **overrides)

    strongest = [spec({"name": "suite"})]
    if placeholder_defense(strongest[0]).has_attention_mask:
        strongest += [spec(dict(attack)) for attack in MASK_ATTACKS]
    return [
        Step("a", "the authors' protocol: PGD-EOT on the 2-call surrogate", (spec({"name": "pgd-eot"}, "surrogate:2"),)),
        Step("b", "PGD-EOT, full gradients through the evaluated defense", (spec({"name": "pgd-eot"}),)),
        Step("c", "APGD-EOT margin, full gradients", (spec({"name": "apgd-eot"}),)),
        Step("d", "the attack suite" + (" + the mask-specific attacks" if len(strongest) > 1 else ""), tuple(strongest)),
    ]


def step_rows(step: Step, rows: list[dict]) -> list[dict | None]:
    """Per spec of ``step``, its finished row of any mode (None: not in the store yet)."""
    found = []
    for spec in step.specs:
        label = row_attack_label(spec)
        matches = [r for r in rows if r["preset"] == spec.preset and r["defense"] == spec.defense
                   and r["attack"] == label and r["gradient_mode"] == spec.gradient
                   and int(r["n_images"]) == spec.n_images and int(r["seed"]) == spec.seed]
        found.append(matches[0] if matches else None)
    return found


@dataclass(frozen=True)
class StepResult:
    step: Step
    attacks: tuple[str, ...]  # the rows' attack labels
    converged: tuple[str, ...]  # the rows' converged flags ("yes", "no", "n/a")
    missing: tuple[str, ...]  # the specs without a finished row
    robust: dict[str, np.ndarray]  # mode -> per-image outcome (the worst case over the step's rows)

    def accuracy(self, mode: str) -> Interval | None:
        return accuracy_interval(self.robust[mode]) if mode in self.robust else None


def _robust_outcomes(store: ResultStore, setup_hash: str, mode: str) -> tuple[np.ndarray, np.ndarray]:
    """(image indices, robust_correct) of one stored row; empty when the mode is not stored."""
    frame = store.per_image(setup_hash, mode)
    if frame.empty:
        return np.array([]), np.array([])
    return frame["index"].to_numpy(), frame["robust_correct"].to_numpy(np.float64)


def step_result(store: ResultStore, step: Step, rows: list[dict], modes: list[str]) -> StepResult:
    """A step's per-image outcomes under each mode, from the store (only when all its rows are there)."""
    found = step_rows(step, rows)
    missing = tuple(f"{s.defense} {s.attack['name']} ({s.gradient})" for s, r in zip(step.specs, found) if r is None)
    robust: dict[str, np.ndarray] = {}
    if not missing:
        for mode in modes:
            per_row = [_robust_outcomes(store, r["setup_hash"], mode) for r in found]
            if any(len(values) == 0 for _, values in per_row):
                continue
            indices = per_row[0][0]
            if any(not np.array_equal(i, indices) for i, _ in per_row):
                raise UserError(f"the rows of step ({step.key}) are not on the same images")
            robust[mode] = np.min([values for _, values in per_row], axis=0)
    present = [r for r in found if r is not None]
    return StepResult(step, tuple(r["attack"] for r in present), tuple(str(r.get("converged", "n/a")) for r in present),
                      missing, robust)


@dataclass(frozen=True)
class Transition:
    """From one step to the next under one mode: robust(later) - robust(earlier), paired."""
    earlier: str
    later: str
    mode: str
    difference: PairedDifference


def transitions(results: list[StepResult], modes: list[str]) -> list[Transition]:
    """Every adjacent pair of steps that both have outcomes, per mode."""
    found = []
    for mode in modes:
        for earlier, later in zip(results, results[1:]):
            if mode in earlier.robust and mode in later.robust:
                found.append(Transition(earlier.step.key, later.step.key, mode,
                                        paired_difference(later.robust[mode], earlier.robust[mode])))
    return found


def study_modes(steps: list[Step]) -> list[str]:
    """The evaluation modes of the study, in the order the protocol comparison reads them: the
    authors' vote first, then the preset's others."""
    modes = evaluation_modes(steps[0].specs[0])
    return sorted(modes, key=lambda m: (not m.startswith("vote"), modes.index(m)))
