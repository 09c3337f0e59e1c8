"""The attack registry (one class per attack, built from a preset's or the command line's
settings), the suite of attacks, and how a row's attack is named."""

from __future__ import annotations

from functools import partial
from typing import TYPE_CHECKING, Any

from ..errors import UserError
from ..registry import Registry
from .apgd import APGDEOT
from .autoattack import build_autoattack
from .base import Attack
from .diffattack import DiffAttack
from .diffhammer import DiffHammer
from .mask_attacks import MaskAvoidingAPGD, MaskAwareAPGD
from .pgd_eot import PGDEOT
from .torchattacks_adapter import TorchAttack

if TYPE_CHECKING:
    from ..defenses.base import Defense

ATTACKS: Registry[list[Attack]] = Registry("attack")
ATTACKS.register("pgd-eot", lambda **kw: [PGDEOT(**kw)], summary="PGD-EOT (Lee & Kim, ICCV 2023), batched EOT")
ATTACKS.register(
    "apgd-eot", lambda **kw: [APGDEOT(**kw)],
    summary="APGD (Croce & Hein, 2020) with batched EOT: loss ce, margin (default) or dlr; steps, eot, restarts, rho",
)
ATTACKS.register(
    "diffattack", lambda **kw: [DiffAttack(**kw)],
    summary="DiffAttack (Kang et al., NeurIPS 2023): APGD-EOT on L_cls + lam * L_dev (deviated reconstruction), "
            "rounds ce then dlr; steps, eot, lam, losses, sampled_steps, restarts, rho",
)
ATTACKS.register(
    "diffhammer", lambda **kw: [DiffHammer(**kw)],
    summary="DiffHammer (Wang et al., 2024): selective EM attack, N-evaluation (Avg/Wor), gradient grafting through "
    "the representative's exact trajectory; losses, steps, purifications, restart_threshold, rho, random_start",
)
ATTACKS.register(
    "mask-aware-apgd", lambda **kw: [MaskAwareAPGD(**kw)],
    summary="APGD-EOT through a straight-through sigmoid relaxation of the defense's attention mask (hetpure): "
            "temperature (0.05) or anneal [T_start, T_end] (geometric per restart); APGD-EOT's settings",
)
ATTACKS.register(
    "mask-avoiding-apgd", lambda **kw: [MaskAvoidingAPGD(**kw)],
    summary="APGD-EOT whose every step leaves the attention mask (strong noise) of the iterate it starts from "
            "untouched, so the perturbation sits in the weak-noise region (hetpure); APGD-EOT's settings",
)
ATTACKS.register(
    "autoattack", build_autoattack,
    summary="AutoAttack via pyautoattack: version standard, rand, or standard+rand (per-image worst of both)",
)
ATTACKS.register(
    "torchattacks", lambda **kw: [TorchAttack.from_settings(**kw)],
    summary="any torchattacks class by name (attack: EOTPGD, APGD, CW, FGSM, ...)",
)
# Settings of the attack dict that are not the attack's own.
COMMON_SETTINGS = ("name", "mask_aware")
# The members of `--attack suite` unless the settings name others (`members`): each an attack's
# name and own settings; their sizes come from the suite's settings per attack name (presets).
# DiffAttack refuses defenses without reverse-process states (Attack.check_target), so the suite
# skips it there.
DEFAULT_SUITE = (
    {"name": "apgd-eot", "loss": "margin"},
    {"name": "apgd-eot", "loss": "ce"},
    {"name": "diffattack"},
)
# The members of `--attack hetpure-adaptive`: plain APGD-EOT and the mask attacks (mask_attacks.py)
# at a temperature sweep and annealed, sized like the suite's (per attack name).
HETPURE_ADAPTIVE = (
    {"name": "apgd-eot", "loss": "margin"},
    {"name": "mask-aware-apgd", "temperature": 0.01},
    {"name": "mask-aware-apgd", "temperature": 0.05},
    {"name": "mask-aware-apgd", "temperature": 0.2},
    {"name": "mask-aware-apgd", "anneal": (0.5, 0.01)},
    {"name": "mask-avoiding-apgd"},
)
SUITES = ("suite", "hetpure-adaptive")  # attacks whose settings are members' (build_suite)


def build_attacks(settings: dict[str, Any], norm: str, eps: float, seed: int) -> list[Attack]:
    """The attacks of one row; an image is robust only if it survives all of them."""
    name = settings.get("name", "pgd-eot")
    own = {k: v for k, v in settings.items() if k not in COMMON_SETTINGS}
    entry = ATTACKS.get(name)
    try:
        return entry.build(norm=norm, eps=eps, seed=seed, **own)
    except TypeError as exc:
        raise UserError(f"bad setting for attack {name!r}: {exc}") from None


def build_suite(norm: str, eps: float, seed: int, members=DEFAULT_SUITE, **settings: Any) -> list[Attack]:
    """The members' attacks, one row's per-image worst case. Each member's settings are, from
    weakest to strongest: the suite's settings for its attack name (``apgd-eot: {steps: 10}``,
    how a preset sizes the members), the member's own (``loss: ce``), then every other suite
    setting (the command line's ``--steps``, ``--eot``: every member takes it)."""
    per_name = {k: v for k, v in settings.items() if k in ATTACKS}
    common = {k: v for k, v in settings.items() if k not in ATTACKS}
    if not isinstance(members, (list, tuple)) or not members:
        raise UserError(f"suite members must be a non-empty list of attack settings, got {members!r}")
    attacks = []
    for member in members:
        if not isinstance(member, dict) or member.get("name") in (None, *SUITES):
            raise UserError(f"a suite member must be an attack's settings with its name (not 'suite' or "
                            f"'hetpure-adaptive'), got {member!r}")
        merged = {**(per_name.get(member["name"]) or {}), **member, **common}
        if "mask_aware" in merged:
            raise UserError("mask_aware applies to a whole suite (attack settings), not to one member")
        attacks += build_attacks(merged, norm, eps, seed)
    return attacks


ATTACKS.register(
    "suite", build_suite,
    summary="per-image worst case over a set of attacks (default: APGD-EOT margin and ce), each one's own accuracy "
    "in robust_by_attack; members that do not apply to the defense are skipped and named",
)
ATTACKS.register(
    "hetpure-adaptive", partial(build_suite, members=HETPURE_ADAPTIVE),
    summary="the suite of hetpure's adaptive attacks: APGD-EOT margin, mask-aware-apgd at T 0.01, 0.05, 0.2 and "
    "annealed 0.5 to 0.01, mask-avoiding-apgd; per-image worst case, each one's accuracy in robust_by_attack",
)


def applicable(attacks: list[Attack], settings: dict[str, Any], defense: "Defense", gradient: str) -> tuple[list[Attack], list[Attack]]:
    """The row's attacks that can run against ``defense`` with ``gradient`` gradients, and the
    suite members skipped because they cannot. An attack named on its own that cannot run, or a
    suite none of whose members can, is refused."""
    fits = [attack.applies_to(defense, gradient) for attack in attacks]
    kept = [a for a, fit in zip(attacks, fits) if fit]
    skipped = [a for a, fit in zip(attacks, fits) if not fit]
    where = f"defense {defense.name!r} with {gradient} gradients"
    if skipped and suite_name(settings) is None:
        skipped[0].check_target(gradient, defense)  # raises the attack's own one-line reason
    if not kept:
        raise UserError(f"no member of the suite applies to {where} ({' + '.join(a.name for a in skipped)})")
    return kept, skipped


def mask_temperature(settings: dict[str, Any]) -> float | None:
    """The mask-aware option: a sigmoid temperature, or None for the plain attack."""
    value = settings.get("mask_aware")
    if value in (None, False):
        return None
    try:
        temperature = 0.05 if value is True else float(value)
    except (TypeError, ValueError):
        raise UserError(f"mask_aware must be a temperature > 0 (e.g. 0.05), got {value!r}") from None
    if temperature <= 0:
        raise UserError(f"mask_aware must be a temperature > 0 (e.g. 0.05), got {value!r}")
    return temperature


def attack_label(attacks: list[Attack], temperature: float | None, suite: str | None = None, skipped: list[Attack] = ()) -> str:
    """The row's attack: the attacks' names joined by " + " (a suite's in ``suite(...)`` or
    ``hetpure-adaptive(...)``, the suite's name, with the members it skipped), and the mask-aware option."""
    label = " + ".join(attack.name for attack in attacks)
    if suite is not None:
        label = f"{suite}({label}" + (f"; skipped, not applicable: {' + '.join(a.name for a in skipped)}" if skipped else "") + ")"
    return label + (f" + mask-aware(T={temperature:g})" if temperature is not None else "")


def suite_name(settings: dict[str, Any]) -> str | None:
    """The suite's name when the row's attack is one (SUITES), else None."""
    name = settings.get("name")
    return name if name in SUITES else None
