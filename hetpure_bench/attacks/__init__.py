"""The attack registry (one class per attack, built from a preset's or the command line's
settings) and how a row's attack is named."""

from __future__ import annotations

from typing import Any

from ..errors import UserError
from ..registry import Registry
from .apgd import APGDEOT
from .autoattack import build_autoattack
from .base import Attack
from .diffhammer import DiffHammer
from .pgd_eot import PGDEOT
from .torchattacks_adapter import TorchAttack

ATTACKS: Registry[list[Attack]] = Registry("attack")
ATTACKS.register("pgd-eot", lambda **kw: [PGDEOT(**kw)], summary="PGD-EOT (Lee & Kim, ICCV 2023), batched EOT")
ATTACKS.register(
    "apgd-eot", lambda **kw: [APGDEOT(**kw)],
    summary="APGD (Croce & Hein, 2020) with batched EOT: loss ce, margin (default) or dlr; steps, eot, restarts, rho",
)
ATTACKS.register(
    "diffhammer", lambda **kw: [DiffHammer(**kw)],
    summary="DiffHammer (Wang et al., 2024): selective EM attack, N-evaluation (Avg/Wor), gradient grafting through "
    "the representative's exact trajectory; losses, steps, purifications, restart_threshold, rho, random_start",
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


def build_attacks(settings: dict[str, Any], norm: str, eps: float, seed: int) -> list[Attack]:
    """The attacks of one row; an image is robust only if it survives all of them."""
    name = settings.get("name", "pgd-eot")
    own = {k: v for k, v in settings.items() if k not in COMMON_SETTINGS}
    entry = ATTACKS.get(name)
    try:
        return entry.build(norm=norm, eps=eps, seed=seed, **own)
    except TypeError as exc:
        raise UserError(f"bad setting for attack {name!r}: {exc}") from None


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


def attack_label(attacks: list[Attack], temperature: float | None) -> str:
    label = " + ".join(attack.name for attack in attacks)
    return label + (f" + mask-aware(T={temperature:g})" if temperature is not None else "")
