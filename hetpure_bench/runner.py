"""The benchmark runner: one defense, one attack, one evaluation mode, on a seeded image subset.

Noise discipline: before each evaluation of a batch the defense is reseeded from (seed, first
image index, purpose). Clean and adversarial predictions share their seed (common random
numbers: with eps = 0 robust accuracy equals clean accuracy exactly); the attack's own passes
use a different seed, so the attacker never sees the evaluation noise.
"""

from __future__ import annotations

import hashlib
import math
import time
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path
from typing import Any

import pandas as pd
import torch
import yaml
from tqdm.auto import tqdm

from .attacks.gradients import attack_model, parse_gradient_mode
from .attacks.pgd_eot import NORMS, PGDEOT
from .classifiers import CLASSIFIERS, load_classifier
from .data import load_cifar10
from .defenses import DEFENSES, build_defense, defense_config, load_entry_point_defenses
from .defenses.base import Defense
from .diffusion.zoo import DIFFUSION_MODELS, load_diffusion_model
from .errors import UserError
from .evaluation import parse_evaluation_mode, predict

ATTACKS = ("pgd-eot",)
MAX_EPS = {"Linf": 1.0, "L2": math.sqrt(3 * 32 * 32)}


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
    defense_overrides.update(overrides.pop("defense_overrides", None) or {})
    attack = dict(settings.pop("attack", {}))
    attack.update(overrides.pop("attack", None) or {})
    settings.update({k: v for k, v in overrides.items() if v is not None})
    settings["eps"] = parse_eps(settings.get("eps", 8 / 255))
    return RunSpec(defense=defense, attack=attack, defense_overrides=defense_overrides, preset=preset, **settings)


def validate(spec: RunSpec) -> None:
    """Every check that needs no network or data, so bad input fails before heavy work."""
    load_entry_point_defenses()
    defense_cls = DEFENSES.build(spec.defense)
    defense_config(spec.defense, spec.defense_overrides, spec.threat)
    CLASSIFIERS.get(spec.classifier)
    if defense_cls.needs_diffusion:
        DIFFUSION_MODELS.get(spec.diffusion_model)
    if spec.threat not in NORMS:
        raise UserError(f"unknown threat model {spec.threat!r}: choose Linf or L2")
    if not 0 <= spec.eps <= MAX_EPS[spec.threat]:
        raise UserError(f"eps {spec.eps:g} is out of range for {spec.threat}: 0 <= eps <= {MAX_EPS[spec.threat]:g}")
    if spec.attack.get("name", "pgd-eot") not in ATTACKS:
        raise UserError(f"unknown attack {spec.attack.get('name')!r} (known: {', '.join(ATTACKS)})")
    if spec.n_images < 1 or spec.batch_size < 1:
        raise UserError("n_images and batch_size must be >= 1")
    parse_gradient_mode(spec.gradient)
    parse_evaluation_mode(spec.evaluation)
    build_attack(spec)


def build_attack(spec: RunSpec) -> PGDEOT:
    params = {k: v for k, v in spec.attack.items() if k != "name"}
    try:
        return PGDEOT(norm=spec.threat, eps=spec.eps, seed=spec.seed, **params)
    except TypeError as exc:
        raise UserError(f"bad attack setting: {exc}") from None


def derived_seed(seed: int, index: int, purpose: str) -> int:
    digest = hashlib.sha256(f"{seed}:{index}:{purpose}".encode()).hexdigest()
    return int(digest[:15], 16)


def attack_and_evaluate(
    defense: Defense,
    target: torch.nn.Module,
    attack: PGDEOT,
    images: torch.Tensor,
    labels: torch.Tensor,
    indices: torch.Tensor,
    spec: RunSpec,
    progress: bool = True,
) -> pd.DataFrame:
    """Per-image clean and adversarial predictions of ``defense``; ``target`` is what the attack
    differentiates (the defense itself, or its surrogate). An image is robust when both its clean
    and its adversarial prediction are correct."""
    records = []
    batches = range(0, len(labels), spec.batch_size)
    for start in tqdm(batches, desc=f"{spec.defense}: attack + evaluate", unit="batch", disable=not progress):
        x, y = images[start:start + spec.batch_size], labels[start:start + spec.batch_size]
        defense.reseed(derived_seed(spec.seed, start, "evaluate"))
        clean = predict(defense, x, spec.evaluation)
        for module in {defense, target}:
            module.reseed(derived_seed(spec.seed, start, "attack"))
        x_adv = attack.perturb(target, x, y, progress=progress)
        defense.reseed(derived_seed(spec.seed, start, "evaluate"))
        adversarial = predict(defense, x_adv, spec.evaluation)
        for i in range(len(y)):
            records.append({
                "index": int(indices[start + i]), "label": int(y[i]),
                "clean_pred": int(clean[i]), "adv_pred": int(adversarial[i]),
                "clean_correct": bool(clean[i] == y[i]),
                "robust_correct": bool(clean[i] == y[i] and adversarial[i] == y[i]),
            })
    return pd.DataFrame(records)


def run(spec: RunSpec, progress: bool = True, cache: dict | None = None) -> tuple[dict, pd.DataFrame]:
    """Run one benchmark row; returns the row and the per-image results.

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
    target = attack_model(defense, spec.gradient)
    attack = build_attack(spec)

    started = time.perf_counter()
    per_image = attack_and_evaluate(
        defense, target, attack, data.as_float(), data.labels, data.index, spec, progress
    )
    wall = time.perf_counter() - started
    row = {
        "defense": spec.defense,
        "defense_config": defense.describe() or "-",
        "classifier": spec.classifier,
        "diffusion_model": spec.diffusion_model if diffusion is not None else "-",
        "data_source": data.source,
        "threat": spec.threat,
        "eps": f"{spec.eps:.6g}",
        "attack": attack.name,
        "gradient_mode": spec.gradient,
        "evaluation": spec.evaluation,
        "n_images": len(per_image),
        "seed": spec.seed,
        "clean_acc": per_image["clean_correct"].mean(),
        "robust_acc": per_image["robust_correct"].mean(),
        "nfe": defense.nfe,
        "wall_s": round(wall, 1),
        "preset": spec.preset,
    }
    return row, per_image
