"""Published CIFAR-10 results (published.yaml): the numbers measured rows are set beside."""

from __future__ import annotations

from dataclasses import dataclass
from importlib import resources

import yaml

from ..bench.evaluation import parse_evaluation_mode

# What `kind` says about an entry: who is plotted and tabulated how.
KINDS = {
    "purification": "a purification method registered here (`method` is its defense name)",
    "purification-other": "another paper's purification method, not implemented here (readable `method`)",
    "reference": "adversarial training or no defense: no purification",
}


@dataclass(frozen=True)
class PublishedResult:
    method: str  # a registered defense name for kind "purification", else a readable name
    classifier: str
    threat: str
    eps: str
    clean: float | None  # %; None where the source prints only robust accuracy
    robust: float  # %
    attack: str
    source: str
    verified: bool
    kind: str = "purification"  # see KINDS
    # How a prediction was formed, in the benchmark's evaluation-mode syntax: "single", "vote:m",
    # "worst:N", "expected:K". The shipped file states it for every entry; the default is only for
    # hand-written fixtures.
    evaluation: str = "single"

    def __post_init__(self):
        if self.kind not in KINDS:
            raise ValueError(f"published entry {self.method!r}: unknown kind {self.kind!r} (use one of {sorted(KINDS)})")
        parse_evaluation_mode(self.evaluation)  # raises on an unknown mode


def load_published(text: str | None = None) -> list[PublishedResult]:
    """The shipped published results (or those in ``text``, YAML of the same form)."""
    if text is None:
        text = (resources.files("hetpure_bench.reporting") / "published.yaml").read_text()
    return [PublishedResult(**{**entry, "eps": str(entry["eps"])}) for entry in yaml.safe_load(text)]
