"""Published CIFAR-10 results (published.yaml): the numbers measured rows are set beside."""

from __future__ import annotations

from dataclasses import dataclass
from importlib import resources

import yaml


@dataclass(frozen=True)
class PublishedResult:
    method: str  # a registered defense name for purification methods
    classifier: str
    threat: str
    eps: str
    clean: float  # %
    robust: float  # %
    attack: str
    source: str
    verified: bool
    kind: str = "purification"  # or "reference" (adversarial training, no defense)


def load_published(text: str | None = None) -> list[PublishedResult]:
    """The shipped published results (or those in ``text``, YAML of the same form)."""
    if text is None:
        text = (resources.files("hetpure_bench.reporting") / "published.yaml").read_text()
    return [PublishedResult(**{**entry, "eps": str(entry["eps"])}) for entry in yaml.safe_load(text)]
