"""The report's image grid: for a few images per defense, the clean and adversarial images, the
defense's stages (mask, noised, purified) and the predicted labels."""

from __future__ import annotations

import numpy as np
import torch

from ..attacks import build_attacks, mask_temperature
from ..attacks.gradients import attack_model
from ..bench.runner import load
from ..bench.spec import RunSpec
from ..bench.stored_examples import decode, encode
from ..data import CLASSES
from ..defenses import build_defense
from ..diffusion.noise import image_seeds


def _hwc(image01: torch.Tensor) -> np.ndarray:
    return image01.detach().cpu().permute(1, 2, 0).numpy()


def grid_caption(spec: RunSpec, n: int) -> str:
    """What the grid's images come from: the preset's models, images and first attack."""
    attack = build_attacks(spec.attack, spec.threat, spec.eps, spec.seed)[0]
    return (f"preset {spec.preset}: {spec.classifier} + {spec.diffusion_model}, the first {n} of its {spec.n_images} "
            f"test images (seed {spec.seed});\n{attack.name}, gradient {spec.gradient}; labels from one purification "
            "(the evaluation's first noise draw)")


def image_panels(spec: RunSpec, n: int, device: torch.device, cache: dict) -> list[dict]:
    """Per image (the first ``n`` of the run's subset): its label and the stages to draw, under the
    spec's first attack; noise as in a benchmark run (the image's own streams), so the purified
    image is the one the single evaluation judged."""
    loaded = load(spec, device, cache)
    defense = build_defense(spec.defense, loaded.classifier, loaded.diffusion, spec.defense_overrides, spec.seed, spec.threat)
    x = loaded.data.as_float()[:n].to(device)
    y = loaded.data.labels[:n].to(device)
    indices = [int(i) for i in loaded.data.index[:n]]
    seeds = lambda purpose: image_seeds(spec.seed, indices, purpose)  # noqa: E731
    attack = build_attacks(spec.attack, spec.threat, spec.eps, spec.seed)[0]
    target = attack_model(defense, spec.gradient, mask_temperature(spec.attack))
    for module in {defense, target}:
        module.reseed(seeds("attack"))
    x_adv = decode(encode(attack.perturb(target, x, y), x), x, attack.norm, attack.eps)  # as the runner judges it
    with torch.no_grad():
        predictions = {}
        for name, inputs in (("clean", x), ("adversarial", x_adv)):
            defense.reseed(seeds("evaluate"))
            predictions[name] = defense(inputs).argmax(1)
        defense.reseed(seeds("evaluate"))
        stages = defense.stages(x_adv)
        purified_pred = loaded.classifier(stages[0][1]).argmax(1)
    panels = []
    for i in range(len(indices)):
        columns = [
            {"image": _hwc(x[i]), "title": f"clean\ndefended: {CLASSES[predictions['clean'][i]]}"},
            {"image": _hwc(x_adv[i]), "title": f"adversarial\ndefended: {CLASSES[predictions['adversarial'][i]]}"},
        ]
        for name, images in stages[1:]:
            if name == "mask":
                columns.append({"image": _hwc(x_adv[i]), "overlay": images[i, 0].detach().cpu().numpy(),
                                "title": "attention mask\n(red: strong noise)"})
            else:
                columns.append({"image": _hwc(images[i]), "title": name.replace(" ", "\n", 1)})
        columns.append({"image": _hwc(stages[0][1][i]), "title": f"purified\nclassifier: {CLASSES[purified_pred[i]]}"})
        panels.append({"index": indices[i], "label": CLASSES[y[i]], "stages": columns})
    return panels
