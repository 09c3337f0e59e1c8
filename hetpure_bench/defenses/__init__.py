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


def make_variant(base: type[Defense], name: str, defaults: dict[str, Any]) -> type[Defense]:
    """A defense that is ``base`` with other default settings (an ablation, say); ``defaults``
    may name nested settings dotted, as overrides do ({"mask.tau": 0.85})."""

    def config_class() -> Any:
        return _apply_overrides(base.config_class(), defaults)

    settings = ", ".join(f"{key}={value!r}" for key, value in defaults.items())
    config_class.__name__ = f"{base.config_class.__name__}({settings})"
    return type(base.__name__, (base,), {"name": name, "config_class": staticmethod(config_class)})


# The paper's ablations and the RePaint-style purifier: hetpure's machinery, other defaults.
HETPURE_VARIANTS = {
    "hetpure-v1": (
        {"stride": 5, "mask.tau": 0.85, "resample_steps": 10},
        "hetpure as first released (2024-10): stride 5 (40 calls), tau 0.85, U = 10",
    ),
    "hetpure-u10": (
        {"resample_steps": 10},
        "hetpure with U = 10 as in the paper text, at the current release's stride 2 and tau 0.9 "
        "(not a released configuration: the current release uses U = 3, the first one is hetpure-v1)",
    ),
    "hetpure-noresample": ({"resampling": "none"}, "hetpure ablation: no resampling"),
    "hetpure-multistep": (
        {"resampling": "multi", "resample_steps": 20},
        "hetpure ablation: RePaint multi-step resampling (U = 20) instead of single-step",
    ),
    "hetpure-uniform-tl": ({"mask_mode": "ones"}, "hetpure ablation: uniform noise at t_l (mask all ones)"),
    "hetpure-uniform-ts": ({"mask_mode": "zeros"}, "hetpure ablation: uniform noise at t_s (mask all zeros)"),
    "hetpure-randmask": ({"mask_mode": "random"}, "hetpure ablation: random mask with the attention mask's area"),
    # RePaint blends before every reverse step (t >= 1 under the "current" rule), takes DDPM
    # steps with x0 clipping and lands on the clean image.
    "repaint": (
        {"t_s": 1, "stage_rule": "current", "final_step": "clean", "sampler": "ddpm", "resampling": "multi", "resample_steps": 20},
        "RePaint-style purification (Lugmayr et al., CVPR 2022): attention mask, known region "
        "re-noised from the input before every step, DDPM steps with x0 clipping, multi-step resampling U = 20",
    ),
}


register_defense(NoDefense, summary="the bare classifier (no purification)")
register_defense(DiffPure, summary="DiffPure (Nie et al., ICML 2022): diffuse to t*, reverse process to 0")
register_defense(GDMP, summary="GDMP (Wang et al., 2022): DDPM purification guided by MSE (or SSIM) to the input, as its official code")
register_defense(
    HeterogeneousPurifier,
    summary="heterogeneous-noise purification (Pei et al., CVPR 2025): attention mask, two-stage DDIM, single-step resampling",
)
for _name, (_defaults, _summary) in HETPURE_VARIANTS.items():
    register_defense(make_variant(HeterogeneousPurifier, _name, _defaults), summary=_summary)


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
