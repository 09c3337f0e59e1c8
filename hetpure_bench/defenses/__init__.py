"""The defense registry. Third-party packages add defenses through the entry-point group
``hetpure_bench.defenses``: each entry point names a ``Defense`` subclass with ``name`` and
``config_class`` attributes."""

from __future__ import annotations

import dataclasses
from importlib.metadata import entry_points
from typing import Any

from torch import nn

from ..errors import UserError
from ..registry import Registry
from .base import Defense, NoDefense
from .diffpure import DiffPure
from .gdmp import GDMP
from .hetpure import HeterogeneousPurifier

ENTRY_POINT_GROUP = "hetpure_bench.defenses"
DEFENSES: Registry[type[Defense]] = Registry("defense")


def register_defense(cls: type[Defense], **info: Any) -> type[Defense]:
    DEFENSES.register(cls.name, lambda: cls, config=cls.config_class.__name__, **info)
    return cls


register_defense(NoDefense, summary="the bare classifier (no purification)")
register_defense(DiffPure, summary="DiffPure (Nie et al., ICML 2022): diffuse to t*, reverse process to 0")
register_defense(GDMP, summary="GDMP (Wang et al., 2022): DDPM purification guided by SSIM or MSE to the input")
register_defense(
    HeterogeneousPurifier,
    summary="heterogeneous-noise purification (Pei et al., CVPR 2025): attention mask, two-stage DDIM, single-step resampling",
)


def load_entry_point_defenses() -> None:
    """Register the defenses that installed packages declare in the entry-point group."""
    for point in entry_points(group=ENTRY_POINT_GROUP):
        if point.name not in DEFENSES:
            cls = point.load()
            if not (isinstance(cls, type) and issubclass(cls, Defense)):
                raise UserError(f"entry point {point.name!r} in {ENTRY_POINT_GROUP} is not a Defense subclass")
            register_defense(cls, source=f"entry point {point.value}")


def _apply_overrides(config: Any, overrides: dict[str, Any]) -> Any:
    """Replace (possibly nested, dotted) dataclass fields: {"t_l": 150, "mask.tau": 0.85}."""
    nested: dict[str, dict[str, Any]] = {}
    flat: dict[str, Any] = {}
    for key, value in overrides.items():
        head, _, rest = key.partition(".")
        if head not in {f.name for f in dataclasses.fields(config)}:
            raise UserError(f"{type(config).__name__} has no setting {head!r}")
        if rest:
            nested.setdefault(head, {})[rest] = value
        else:
            flat[head] = value
    for head, sub in nested.items():
        flat[head] = _apply_overrides(getattr(config, head), sub)
    try:
        return dataclasses.replace(config, **flat)
    except TypeError as exc:
        raise UserError(f"bad setting for {type(config).__name__}: {exc}") from None


def defense_config(name: str, overrides: dict[str, Any] | None = None, threat: str = "Linf") -> Any:
    """The configuration of a registered defense: defaults, threat-model defaults, then overrides."""
    cls = DEFENSES.build(name)
    settings = {**cls.threat_defaults.get(threat, {}), **(overrides or {})}
    return _apply_overrides(cls.config_class(), settings)


def build_defense(
    name: str,
    classifier: nn.Module,
    diffusion: nn.Module | None,
    overrides: dict[str, Any] | None = None,
    seed: int = 0,
    threat: str = "Linf",
) -> Defense:
    """Build a registered defense: its defaults, then its threat-model defaults, then overrides."""
    cls = DEFENSES.build(name)
    config = defense_config(name, overrides, threat)
    return cls(classifier, diffusion if cls.needs_diffusion else None, config, seed)
