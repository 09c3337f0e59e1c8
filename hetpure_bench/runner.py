"""The benchmark runner: one defense, one attack, one evaluation mode, on a seeded image subset.

Noise discipline: before each evaluation of a batch the defense is reseeded from (seed, first
image index, purpose). Clean and adversarial predictions share their seed (common random
numbers: with eps = 0 robust accuracy equals clean accuracy exactly); the attack's own passes
use a different seed, so the attacker never sees the evaluation noise.
"""

from __future__ import annotations

import dataclasses
import hashlib
import time
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path
from typing import Any

import pandas as pd
import torch
import yaml
from tqdm.auto import tqdm

from .attacks import attack_label, build_attacks, mask_temperature
from .attacks.base import Attack
from .attacks.gradients import attack_model, check_mask_aware, parse_gradient_mode
from .attacks.threat import check_threat, perturbation_size
from .classifiers import classifier_entry, load_classifier
from .data import load_cifar10
from .defenses import DEFENSES, build_defense, defense_config, load_entry_point_defenses
from .defenses.base import Defense
from .diffusion.zoo import DIFFUSION_MODELS, load_diffusion_model
from .errors import UserError
from .evaluation import parse_evaluation_mode, predict
from .sanity import SanityConfig, run_sanity_checks, summarise


def parse_eps(value: Any) -> float:
    """A float, or a fraction written "8/255"."""
    try:
        if isinstance(value, str) and "/" in value:
            numerator, denominator = value.split("/")
            return float(numerator) / float(denominator)
        return float(value)
    except (ValueError, ZeroDivisionError):
        raise UserError(f"eps must be a number or a fraction like 8/255, got {value!r}") from None


@dataclass
class RunSpec:
    defense: str
    classifier: str = "resnet18-pyautoattack"
    diffusion_model: str = "embedded-denoiser"
    data: str | None = None
    n_images: int = 32
    seed: int = 0
    threat: str = "Linf"
    eps: float = 8 / 255
    attack: dict = field(default_factory=lambda: {"name": "pgd-eot"})
    gradient: str = "full"
    evaluation: str = "single"
    batch_size: int = 32
    defense_overrides: dict = field(default_factory=dict)
    sanity: dict = field(default_factory=dict)
    preset: str = "smoke"


def load_preset(name: str) -> dict:
    path = resources.files("hetpure_bench") / "presets" / f"{name}.yaml"
    if not path.is_file():
        known = sorted(p.name[:-5] for p in resources.files("hetpure_bench").joinpath("presets").iterdir() if p.name.endswith(".yaml"))
        raise UserError(f"unknown preset {name!r} (known: {', '.join(known)})")
    return yaml.safe_load(path.read_text())


def spec_from_preset(preset: str, defense: str, **overrides: Any) -> RunSpec:
    """A RunSpec from a shipped preset, with command-line values (not None) taking precedence."""
    settings = load_preset(preset)
    defense_overrides = dict((settings.pop("defenses", None) or {}).get(defense, {}))
    # A preset may give a defense its own diffusion model (GDMP uses Ho et al.'s DDPM).
    if "diffusion_model" in defense_overrides:
        settings["diffusion_model"] = defense_overrides.pop("diffusion_model")
    defense_overrides.update(overrides.pop("defense_overrides", None) or {})
    # The preset names its attack and keeps settings per attack, so that choosing another
    # attack on the command line picks up the preset's settings for that one.
    per_attack = settings.pop("attacks", None) or {}
    requested = dict(overrides.pop("attack", None) or {})
    name = requested.pop("name", None) or settings.get("attack", "pgd-eot")
    settings.pop("attack", None)
    attack = {"name": name, **(per_attack.get(name) or {}), **requested}
    settings.update({k: v for k, v in overrides.items() if v is not None})
    settings["eps"] = parse_eps(settings.get("eps", 8 / 255))
    return RunSpec(defense=defense, attack=attack, defense_overrides=defense_overrides, preset=preset, **settings)


def validate(spec: RunSpec) -> None:
    """Every check that needs no network or data, so bad input fails before heavy work."""
    load_entry_point_defenses()
    defense_cls = DEFENSES.build(spec.defense)
    config = defense_config(spec.defense, spec.defense_overrides, spec.threat)
    classifier_entry(spec.classifier)
    if defense_cls.needs_diffusion:
        DIFFUSION_MODELS.get(spec.diffusion_model)
    check_threat(spec.threat, spec.eps)
    if spec.n_images < 1 or spec.batch_size < 1:
        raise UserError("n_images and batch_size must be >= 1")
    parse_gradient_mode(spec.gradient)
    evaluation_modes(spec)
    build_attacks(spec.attack, spec.threat, spec.eps, spec.seed)
    if mask_temperature(spec.attack) is not None:
        check_mask_aware(spec.gradient, spec.defense, config)
    sanity_config(spec)


def sanity_config(spec: RunSpec) -> SanityConfig:
    try:
        return SanityConfig(**spec.sanity)
    except TypeError as exc:
        raise UserError(f"bad sanity setting: {exc}") from None


def derived_seed(seed: int, index: int, purpose: str) -> int:
    digest = hashlib.sha256(f"{seed}:{index}:{purpose}".encode()).hexdigest()
    return int(digest[:15], 16)


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
    """Per-image results of ``defense`` under the spec's one evaluation mode (see evaluate_modes)."""
    frames, _ = evaluate_modes(defense, target, attacks, images, labels, indices, spec, [spec.evaluation], progress)
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
) -> tuple[dict[str, pd.DataFrame], dict[str, float]]:
    """Attack once, then judge the same adversarial examples under each evaluation mode.

    Per mode, per image: clean and adversarial predictions of ``defense``; ``target`` is what
    the attacks differentiate (the defense itself, its surrogate, BPDA, ...). An image is robust
    when its clean prediction and its prediction on every attack's example are correct (per-image
    worst case over the attacks); ``adv_pred`` is the prediction on the first example that broke
    it. Also returns the seconds spent attacking ("attack") and evaluating (per mode).
    """
    records: dict[str, list] = {mode: [] for mode in modes}
    seconds = dict.fromkeys(["attack", *modes], 0.0)
    batches = range(0, len(labels), spec.batch_size)
    for start in tqdm(batches, desc=f"{spec.defense}: attack + evaluate", unit="batch", disable=not progress):
        x, y = images[start:start + spec.batch_size], labels[start:start + spec.batch_size]
        started = time.perf_counter()
        examples = []
        for attack in attacks:
            for module in {defense, target}:
                module.reseed(derived_seed(spec.seed, start, "attack"))
            x_adv = attack.perturb(target, x, y, progress=progress)
            if (perturbation_size(x_adv - x, attack.norm) > attack.eps * (1 + 1e-5) + 1e-7).any() or x_adv.min() < 0 or x_adv.max() > 1:
                raise RuntimeError(f"{attack.name} left the {attack.norm} eps-ball or the [0,1] box")  # a bug, never a result
            examples.append(x_adv)
        seconds["attack"] += time.perf_counter() - started
        for mode in modes:
            started = time.perf_counter()
            # Common random numbers: the clean and every adversarial evaluation share their seed.
            predictions = []
            for inputs in [x, *examples]:
                defense.reseed(derived_seed(spec.seed, start, "evaluate"))
                predictions.append(predict(defense, inputs, y, mode))
            records[mode].extend(_records(predictions[0], predictions[1:], y, indices[start:start + len(y)]))
            seconds[mode] += time.perf_counter() - started
    return {mode: pd.DataFrame(rows) for mode, rows in records.items()}, seconds


def _records(clean: torch.Tensor, adversarial: list[torch.Tensor], y: torch.Tensor, indices: torch.Tensor) -> list[dict]:
    records = []
    for i in range(len(y)):
        survived = [bool(pred[i] == y[i]) for pred in adversarial]
        broken = [pred[i] for pred in adversarial if pred[i] != y[i]]
        record = {
            "index": int(indices[i]), "label": int(y[i]),
            "clean_pred": int(clean[i]), "adv_pred": int(broken[0] if broken else adversarial[-1][i]),
            "clean_correct": bool(clean[i] == y[i]),
            "robust_correct": bool(clean[i] == y[i] and all(survived)),
        }
        if len(adversarial) > 1:
            record.update({f"robust_correct_{k}": bool(clean[i] == y[i] and ok) for k, ok in enumerate(survived)})
        records.append(record)
    return records


def evaluation_modes(spec: RunSpec) -> list[str]:
    """The row's evaluation modes: one, or several separated by commas ("single,worst:5"),
    which then judge the same adversarial examples and give one row each."""
    modes = [m.strip() for m in str(spec.evaluation).split(",") if m.strip()]
    for mode in modes:
        parse_evaluation_mode(mode)
    if not modes or len(set(modes)) != len(modes):
        raise UserError(f"evaluation {spec.evaluation!r} must name each mode once")
    return modes


def run(spec: RunSpec, progress: bool = True, cache: dict | None = None) -> list[tuple[dict, pd.DataFrame]]:
    """Run one benchmark setup; returns (row, per-image results) per evaluation mode.

    ``cache`` (a dict kept by the caller) shares loaded data and networks between the rows of
    one invocation.
    """
    validate(spec)
    cache = {} if cache is None else cache

    def cached(key, load):
        if key not in cache:
            cache[key] = load()
        return cache[key]

    data = cached(("data", spec.data, spec.n_images, spec.seed),
                  lambda: load_cifar10(spec.data, split="test").subset(spec.n_images, spec.seed))
    classifier = cached(("classifier", spec.classifier), lambda: load_classifier(spec.classifier))
    defense_cls = DEFENSES.build(spec.defense)
    diffusion = (
        cached(("diffusion", spec.diffusion_model), lambda: load_diffusion_model(spec.diffusion_model))
        if defense_cls.needs_diffusion else None
    )
    defense = build_defense(spec.defense, classifier, diffusion, spec.defense_overrides, spec.seed, spec.threat)
    temperature = mask_temperature(spec.attack)
    target = attack_model(defense, spec.gradient, temperature)
    attacks = build_attacks(spec.attack, spec.threat, spec.eps, spec.seed)
    images, modes = data.as_float(), evaluation_modes(spec)

    frames, seconds = evaluate_modes(defense, target, attacks, images, data.labels, data.index, spec, modes, progress)
    started = time.perf_counter()
    checks = sanity_checks(defense, target, attacks, classifier, images, data.labels, data.index, spec, frames)
    sanity_wall = time.perf_counter() - started
    results = []
    for mode in modes:
        per_image = frames[mode]
        row = {
            "defense": spec.defense,
            "defense_config": defense.describe() or "-",
            "classifier": spec.classifier,
            "diffusion_model": diffusion_label(spec.diffusion_model, diffusion),
            "data_source": data.source,
            "threat": spec.threat,
            "eps": f"{spec.eps:.6g}",
            "attack": attack_label(attacks, temperature),
            "gradient_mode": spec.gradient,
            "evaluation": mode,
            "n_images": len(per_image),
            "seed": spec.seed,
            "clean_acc": per_image["clean_correct"].mean(),
            "robust_acc": per_image["robust_correct"].mean(),
            "robust_by_attack": robust_by_attack(per_image, attacks),
            "nfe": defense.nfe,
            # What this row would cost alone: the (shared) attack plus its own evaluation.
            "wall_s": round(seconds["attack"] + seconds[mode], 1),
            "sanity": summarise(checks[mode]) if checks[mode] else "not run",
            "sanity_checks": [dataclasses.asdict(c) for c in checks[mode]],
            "sanity_wall_s": round(sanity_wall, 1),
            "preset": spec.preset,
        }
        results.append((row, per_image))
    return results


def diffusion_label(name: str, diffusion) -> str:
    """The model name, with its training step when its weights say (the embedded denoiser)."""
    if diffusion is None:
        return "-"
    steps = (getattr(diffusion, "metadata", None) or {}).get("steps")
    return f"{name}@{steps}" if steps else name


def robust_by_attack(per_image: pd.DataFrame, attacks: list[Attack]) -> str:
    """Each attack's own robust accuracy (%) when a row has several ("-" otherwise); the row's
    robust_acc is the per-image worst case, never above the minimum of these."""
    if len(attacks) < 2:
        return "-"
    return "; ".join(f"{a.name} {100 * per_image[f'robust_correct_{k}'].mean():.1f}" for k, a in enumerate(attacks))


def sanity_checks(
    defense, target, attacks, classifier, images, labels, indices, spec: RunSpec, frames: dict[str, pd.DataFrame]
) -> dict[str, list]:
    """Per evaluation mode, the sanity checks on the first ``sanity.images`` images of the row
    (sanity.py); the row's own results (``frames``) are the full-budget reference."""
    config, modes = sanity_config(spec), list(frames)
    n = min(config.images, len(labels))
    if n == 0:
        return {mode: [] for mode in modes}
    x, y, index = images[:n], labels[:n], indices[:n]
    slice_spec = dataclasses.replace(spec, batch_size=n)
    memo: dict = {}

    def evaluate_all(attacks_, other_defense=None, other_target=None):
        key = (tuple(attacks_), type(other_defense).__name__, type(other_target).__name__)
        if key not in memo:  # every mode judges the same examples: attack once
            memo[key] = evaluate_modes(
                defense if other_defense is None else other_defense, target if other_target is None else other_target,
                attacks_, x, y, index, slice_spec, modes, progress=False,
            )[0]
        return memo[key]

    checks = {}
    for mode in modes:
        full = frames[mode].iloc[:n].reset_index(drop=True)
        evaluate = lambda attacks_, d=None, t=None, mode=mode: evaluate_all(attacks_, d, t)[mode]  # noqa: E731
        checks[mode] = run_sanity_checks(evaluate, full, attacks, target, classifier, x, y, spec.threat, config)
    return checks
