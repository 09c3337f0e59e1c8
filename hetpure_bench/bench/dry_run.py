"""``run --dry-run``: what each row of a run would cost, before anything heavy runs."""

from __future__ import annotations

import torch
from torch import nn

from ..attacks.gradients import parse_gradient_mode
from ..defenses import DEFENSES
from ..defenses.base import Defense
from ..models.classifiers import classifier_entry
from ..models.diffusion_zoo import DIFFUSION_MODELS
from ..registry import Entry
from .cost import PassTimes, estimate, measure_passes
from .spec import RunSpec, evaluation_modes, placeholder_defense, row_attacks, spec_attack_label
from .statistics import CONFIDENCE, half_width

SIZES = (32, 64, 128, 256, 512)  # the sizing line's alternatives (README's table)


def timing_network(entry: Entry) -> tuple[nn.Module | None, str]:
    """The network to time: the real one when available offline, else the same architecture
    with random weights (timing does not depend on the weights)."""
    if entry.available():
        model = entry.build()
        return (model.eval() if model is not None else None), "real weights"
    build = entry.info.get("build_architecture")
    if build is None:
        return None, "unknown architecture (weights missing)"
    return build().eval(), "random weights of the same architecture (real ones not cached)"


def _defense_nfe(spec: RunSpec, defense: Defense) -> tuple[int, int | None]:
    kind, calls = parse_gradient_mode(spec.gradient)
    return defense.nfe, defense.surrogate(calls).nfe if kind == "surrogate" else None


def print_estimates(specs: list[RunSpec]) -> None:
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    timings: dict[tuple[str, str], PassTimes] = {}
    print(f"dry run on {device} ({torch.cuda.get_device_name(device) if device.type == 'cuda' else 'CPU'}); "
          "sanity checks not included")
    print("| defense | diffusion model | NFE | attack | gradient | evaluation | diffusion calls / image | classifier passes / image | hours | interval half-width |")
    print("|---|---|---|---|---|---|---|---|---|---|")
    for spec in specs:
        needs_diffusion = DEFENSES.build(spec.defense).needs_diffusion
        key = (spec.classifier, spec.diffusion_model if needs_diffusion else "-")
        if key not in timings:
            batch = spec.batch_size if device.type == "cuda" else min(spec.batch_size, 4)
            classifier, classifier_weights = timing_network(classifier_entry(spec.classifier))
            diffusion, diffusion_weights = (
                timing_network(DIFFUSION_MODELS.get(spec.diffusion_model)) if needs_diffusion else (None, "-")
            )
            if classifier is None or (needs_diffusion and diffusion is None):
                print(f"| {spec.defense} | cannot time {key}: {classifier_weights}, {diffusion_weights} |")
                continue
            timings[key] = measure_passes(diffusion.to(device) if diffusion is not None else None, classifier.to(device), batch, device)
            t = timings[key]
            print(f"(measured at batch {batch}, seconds per image: {spec.diffusion_model if needs_diffusion else 'no diffusion'} "
                  f"forward {t.diffusion_forward:.4f}, forward+backward {t.diffusion_forward_backward:.4f} [{diffusion_weights}]; "
                  f"{spec.classifier} forward {t.classifier_forward:.4f}, forward+backward {t.classifier_forward_backward:.4f} [{classifier_weights}])")
        defense = placeholder_defense(spec)
        attacks, skipped = row_attacks(spec, defense)
        nfe, surrogate_nfe = _defense_nfe(spec, defense)
        label = spec_attack_label(spec, attacks, skipped)
        for mode in evaluation_modes(spec):
            cost = estimate(attacks, nfe, spec.gradient, mode, spec.n_images, timings[key], surrogate_nfe)
            print(f"| {spec.defense} | {key[1]} | {nfe} | {label} | {spec.gradient} | {mode} | "
                  f"{cost.network_calls_per_image:,} | {cost.classifier_passes_per_image:,} | {cost.hours:,.1f} ({spec.n_images} images) | "
                  f"+-{points(spec.n_images)} points |")
    for n in sorted({spec.n_images for spec in specs}):
        print(sizing_line(n))


def points(n: int) -> int:
    """The widest 95% interval's half-width at n images, in whole accuracy points."""
    return round(100 * half_width(n))


def sizing_line(n: int) -> str:
    """How precise accuracies at n images are, and what other numbers of images would give."""
    others = ", ".join(f"{m} images give +-{points(m)}" for m in SIZES if m != n)
    return (f"sizing: +-{points(n)} points at {n} images (half-width of the {100 * CONFIDENCE:g}% Wilson interval "
            f"at 50% accuracy, the widest); {others}")
