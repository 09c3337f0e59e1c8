"""One batch attacked once and judged under every evaluation mode (the noise discipline is
evaluate_batch's); evaluate_modes runs it over a set of images in batches."""

from __future__ import annotations

import time

import pandas as pd
import torch
from tqdm.auto import tqdm

from ..attacks.base import Attack
from ..attacks.threat import perturbation_size
from ..defenses.base import Defense
from ..diffusion.noise import image_seeds
from .evaluation import judged_labels, outcomes, parse_evaluation_mode, purification_passes
from .spec import RunSpec, evaluation_seed
from .stored_examples import decode, encode
from .stored_histories import encode as encode_history


def attack_and_evaluate(
    defense: Defense,
    target: torch.nn.Module,
    attacks: list[Attack],
    images: torch.Tensor,
    labels: torch.Tensor,
    indices: torch.Tensor,
    spec: RunSpec,
    progress: bool = True,
) -> pd.DataFrame:
    """Per-image results of ``defense`` under the spec's one evaluation mode (see evaluate_batch)."""
    frames = evaluate_modes(defense, target, attacks, images, labels, indices, spec, [spec.evaluation], progress)
    return frames[spec.evaluation]


def evaluate_modes(
    defense: Defense,
    target: torch.nn.Module,
    attacks: list[Attack],
    images: torch.Tensor,
    labels: torch.Tensor,
    indices: torch.Tensor,
    spec: RunSpec,
    modes: list[str],
    progress: bool = True,
) -> dict[str, pd.DataFrame]:
    """evaluate_batch over the images in batches of ``spec.batch_size``; per-image frames per mode."""
    records: dict[str, list] = {mode: [] for mode in modes}
    for start in tqdm(range(0, len(labels), spec.batch_size), desc=f"{spec.defense}: attack + evaluate",
                      unit="batch", disable=not progress):
        stop = start + spec.batch_size
        batch, _, _, _ = evaluate_batch(defense, target, attacks, images[start:stop], labels[start:stop],
                                        indices[start:stop], spec.seed, modes, progress, evaluation_seed(spec))
        for mode in modes:
            records[mode].extend(batch[mode])
    return {mode: pd.DataFrame(rows) for mode, rows in records.items()}


def evaluate_batch(
    defense: Defense,
    target: torch.nn.Module,
    attacks: list[Attack],
    x: torch.Tensor,
    y: torch.Tensor,
    indices: torch.Tensor,
    seed: int,
    modes: list[str],
    progress: bool = False,
    eval_seed: int | None = None,
    stored: list[bytes] | None = None,
) -> tuple[dict[str, list[dict]], dict, list[bytes], dict[int, bytes]]:
    """Attack one batch once (unless its ``stored`` examples are given), then judge the same
    adversarial examples under each evaluation mode.

    Per mode, per image: clean and adversarial predictions of ``defense``; ``target`` is what
    the attacks differentiate (the defense itself, its surrogate, BPDA, ...). An image is robust
    when its clean prediction and its prediction on every attack's example are correct (per-image
    worst case over the attacks; for expected:K per purification, see _records). Noise comes from
    per-image streams seeded from (seed, image index, purpose): the attack's passes and the
    evaluation use different purposes, so the attacker never sees the evaluation noise, and the
    clean and every adversarial evaluation share theirs (common random numbers: at eps = 0 the
    adversarial predictions equal the clean ones exactly). ``eval_seed`` (default ``seed``) seeds
    the evaluation streams. The modes share their purifications ("single" is the first pass of
    "worst:N"). Returns the records per mode, the cost (seconds attacking, "attack_s", and per
    attack by attack index, "attack_s_by_attack", 0 for stored examples; "eval_s" per mode: the
    seconds of its own passes), the examples in their
    stored form (stored_examples.py), which are what was judged, and the stored histories of the
    attacks that record one (attack index -> stored_histories blob; none for stored examples).
    """
    started = time.perf_counter()
    if stored is None:
        blobs, histories, seconds = attack_batch(defense, target, attacks, x, y, indices, seed, progress)
    else:
        blobs, histories, seconds = stored, {}, [0.0] * len(attacks)
    attack_s = time.perf_counter() - started
    records, eval_s = judge_batch(defense, attacks, x, y, indices, blobs, seed if eval_seed is None else eval_seed, modes, progress)
    return records, {"attack_s": attack_s, "attack_s_by_attack": seconds, "eval_s": eval_s}, blobs, histories


def attack_batch(
    defense: Defense, target: torch.nn.Module, attacks: list[Attack], x: torch.Tensor, y: torch.Tensor,
    indices: torch.Tensor, seed: int, progress: bool = False,
) -> tuple[list[bytes], dict[int, bytes], list[float]]:
    """Each attack's adversarial examples of the [0,1] images ``x``, in their stored form, the
    stored histories of those attacks that record one (by attack index) and each attack's
    seconds (its examples copied to the CPU inside them, so queued GPU work is counted)."""
    attack_seeds = image_seeds(seed, indices, "attack")
    blobs, histories, seconds = [], {}, []
    for j, attack in enumerate(attacks):
        started = time.perf_counter()
        for module in {defense, target}:
            module.reseed(attack_seeds)
        x_adv, history = attack.perturb_with_history(target, x, y, progress=progress)
        if (perturbation_size(x_adv - x, attack.norm) > attack.eps * (1 + 1e-5) + 1e-7).any() or x_adv.min() < 0 or x_adv.max() > 1:
            raise RuntimeError(f"{attack.name} left the {attack.norm} eps-ball or the [0,1] box")  # a bug, never a result
        blobs.append(encode(x_adv, x))
        if history is not None:
            histories[j] = encode_history(history)
        seconds.append(time.perf_counter() - started)
    return blobs, histories, seconds


def judge_batch(
    defense: Defense, attacks: list[Attack], x: torch.Tensor, y: torch.Tensor, indices: torch.Tensor,
    blobs: list[bytes], eval_seed: int, modes: list[str], progress: bool = False,
) -> tuple[dict[str, list[dict]], dict[str, float]]:
    """Records per mode of the clean [0,1] images ``x`` and the stored adversarial examples
    ``blobs`` (one per attack), and each mode's seconds of purification."""
    if len(blobs) != len(attacks):
        raise ValueError(f"{len(blobs)} stored examples for {len(attacks)} attacks")
    examples = [decode(blob, x, attack.norm, attack.eps) for blob, attack in zip(blobs, attacks)]
    evaluate_seeds = image_seeds(eval_seed, indices, "evaluate")
    eval_s = dict.fromkeys(modes, 0.0)
    passes = {mode: parse_evaluation_mode(mode)[1] for mode in modes}
    per_input = []
    n_passes = max(passes.values())
    owners = f"{len(examples)} attack's" if len(examples) == 1 else f"{len(examples)} attacks'"
    label = f"evaluate clean + {owners} examples, {n_passes} passes each"
    for inputs in tqdm([x, *examples], desc=label, unit="input", leave=False, disable=not progress):
        defense.reseed(evaluate_seeds)  # so pass k is the same in every mode: the modes share passes
        predictions, seconds = purification_passes(defense, inputs, n_passes)
        per_input.append(predictions)
        for mode in modes:  # each mode is charged its own passes
            eval_s[mode] += sum(seconds[:passes[mode]])
    records = {}
    for mode in modes:
        clean, *adversarial = [judged_labels(mode, predictions, y) for predictions in per_input]
        records[mode] = _records(mode, clean, adversarial, y, indices)
    return records, eval_s


def _records(mode: str, clean: torch.Tensor, adversarial: list[torch.Tensor], y: torch.Tensor, indices: torch.Tensor) -> list[dict]:
    """Per-image records from the judged labels (P, B) of the clean images and of each attack's
    examples (P = 1 except for expected:K, evaluation.judged_labels). In judged pass k an image is
    robust when its clean label and every attack's label are right (pass k of every input uses
    the same evaluation noise), robust to attack j when its clean label and attack j's are; the
    *_correct values are the outcomes over the passes (evaluation.outcomes). The labels shown are
    the first pass's: adv_pred is the first attack's wrong label in it (else the last attack's)."""
    clean, adversarial, y = clean.cpu(), [a.cpu() for a in adversarial], y.cpu()
    clean_ok = clean == y
    survived = [a == y for a in adversarial]
    robust = clean_ok.clone()
    for ok in survived:
        robust &= ok
    columns = {"clean_correct": outcomes(mode, clean_ok), "robust_correct": outcomes(mode, robust)}
    if len(adversarial) > 1:
        columns.update({f"robust_correct_{k}": outcomes(mode, clean_ok & ok) for k, ok in enumerate(survived)})
    first = [a[0] for a in adversarial]
    records = []
    for i in range(len(y)):
        broken = [pred[i] for pred in first if pred[i] != y[i]]
        records.append({
            "index": int(indices[i]), "label": int(y[i]),
            "clean_pred": int(clean[0, i]), "adv_pred": int(broken[0] if broken else first[-1][i]),
            **{name: values[i] for name, values in columns.items()},
        })
    return records
