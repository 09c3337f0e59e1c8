"""A run's specification: the RunSpec, the shipped presets it is built from, and the checks
that reject bad input before any heavy work."""

from __future__ import annotations

from dataclasses import dataclass, field
from importlib import resources
from typing import Any

import yaml
from torch import nn

from ..attacks import applicable, attack_label, build_attacks, mask_temperature, suite_name
from ..attacks.base import Attack
from ..attacks.gradients import check_mask_aware, parse_gradient_mode
from ..attacks.threat import check_threat
from ..defenses import DEFENSES, build_defense, defense_config, load_entry_point_defenses
from ..defenses.base import Defense
from ..errors import UserError
from ..models.classifiers import classifier_entry
from ..models.diffusion_zoo import DIFFUSION_MODELS
from .evaluation import parse_evaluation_mode
from .sanity import SanityConfig


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
    seed: int = 0  # the defense's and the attack's noise
    data_seed: int | None = None  # the image subset's RandomState seed (None: ``seed``)
    eval_seed: int | None = None  # the evaluation noise's seed; None: the run's seed
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
    path = resources.files("hetpure_bench.bench") / "presets" / f"{name}.yaml"
    if not path.is_file():
        known = sorted(p.name[:-5] for p in resources.files("hetpure_bench.bench").joinpath("presets").iterdir() if p.name.endswith(".yaml"))
        raise UserError(f"unknown preset {name!r} (known: {', '.join(known)})")
    return yaml.safe_load(path.read_text())


def preset_sibling(name: str) -> str | None:
    """The other protocol family of a paper preset: ``P-reference`` (the authors' own evaluation)
    for ``P`` (the strongest protocol) and back; None when there is no such preset."""
    other = name[: -len("-reference")] if name.endswith("-reference") else f"{name}-reference"
    return other if (resources.files("hetpure_bench.bench") / "presets" / f"{other}.yaml").is_file() else None


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
    settings.pop("sweeps", None)  # used by the sweep command only
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
    if spec.eval_seed is not None and (type(spec.eval_seed) is not int or spec.eval_seed < 0):
        raise UserError(f"eval seed must be an integer >= 0, got {spec.eval_seed!r}")
    parse_gradient_mode(spec.gradient)
    evaluation_modes(spec)
    row_attacks(spec, placeholder_defense(spec))
    if mask_temperature(spec.attack) is not None:
        check_mask_aware(spec.gradient, spec.defense, config)
    sanity_config(spec)


def placeholder_defense(spec: RunSpec) -> Defense:
    """The spec's defense around placeholder networks: its configuration and NFE without loading
    any weights (checks and estimates before the real networks load)."""
    return build_defense(spec.defense, nn.Identity(), nn.Identity(), spec.defense_overrides, spec.seed, spec.threat)


def row_attacks(spec: RunSpec, defense: Defense) -> tuple[list[Attack], list[Attack]]:
    """The row's attacks that can run against ``defense`` and the suite members skipped
    (attacks.applicable)."""
    return applicable(build_attacks(spec.attack, spec.threat, spec.eps, spec.seed), spec.attack, defense, spec.gradient)


def spec_attack_label(spec: RunSpec, attacks: list[Attack], skipped: list[Attack] = ()) -> str:
    """The row's ``attack`` label for its ``attacks`` and the suite members ``skipped``
    (row_attacks): what the store's rows of this spec are called."""
    return attack_label(attacks, mask_temperature(spec.attack), suite_name(spec.attack), skipped)


def row_attack_label(spec: RunSpec) -> str:
    """The ``attack`` label of the spec's rows, without loading any network."""
    return spec_attack_label(spec, *row_attacks(spec, placeholder_defense(spec)))


def evaluation_seed(spec: RunSpec) -> int:
    """The seed of the evaluation noise: the eval seed when given, else the run's seed."""
    return spec.seed if spec.eval_seed is None else spec.eval_seed


def sanity_config(spec: RunSpec) -> SanityConfig:
    try:
        return SanityConfig(**spec.sanity)
    except TypeError as exc:
        raise UserError(f"bad sanity setting: {exc}") from None


def evaluation_modes(spec: RunSpec) -> list[str]:
    """The row's evaluation modes: one, or several separated by commas ("single,worst:5"),
    which then judge the same adversarial examples and give one row each."""
    modes = [m.strip() for m in str(spec.evaluation).split(",") if m.strip()]
    for mode in modes:
        parse_evaluation_mode(mode)
    if not modes or len(set(modes)) != len(modes):
        raise UserError(f"evaluation {spec.evaluation!r} must name each mode once")
    return modes
