"""Times the workloads the adopted optimisations touch, for whichever hetpure_bench is imported,
so that two checkouts can be compared (run each a few times, alternating):

    PYTHONPATH=<checkout> python benchmarks/before_after.py --data ../shared/data/cifar10-jpeg

Workloads (smoke setup: pyautoattack's ResNet-18, the embedded denoiser, hetpure on a 10-call
grid, the first images of the 32 drawn with seed 0): one full-gradient PGD-EOT step on 32 images
with EOT 2 (the smoke attack's step) and on 8 images with EOT 4, and the evaluation of the clean
images and one adversarial batch under "single" and "worst:5" together (the smoke modes).
It repeats performance.py's attack step on purpose: performance.py imports what older checkouts
do not have, and this script must run against them.
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch
import torch.nn.functional as F

from hetpure_bench.attacks.pgd_eot import PGDEOT
from hetpure_bench.bench.batches import evaluate_modes
from hetpure_bench.bench.spec import RunSpec
from hetpure_bench.data import load_cifar10
from hetpure_bench.defenses import build_defense
from hetpure_bench.models.classifiers import load_classifier
from hetpure_bench.models.diffusion_zoo import load_diffusion_model


def median_seconds(fn, repeats: int) -> float:
    fn()  # warm-up
    runs = []
    for _ in range(repeats):
        started = time.perf_counter()
        fn()
        runs.append(time.perf_counter() - started)
    return statistics.median(runs)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", default="../shared/data/cifar10-jpeg")
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    classifier, diffusion = load_classifier("resnet18-pyautoattack"), load_diffusion_model("embedded-denoiser")
    data = load_cifar10(args.data, split="test").subset(32, 0)
    x, y = data.as_float(), data.labels
    hetpure = build_defense("hetpure", classifier, diffusion, {"stride": 20})

    def attack_step(images: int, eot: int):
        def go():
            hetpure.reseed(0)
            x_adv = x[:images].clone().requires_grad_(True)
            logits = hetpure(x_adv.repeat(eot, 1, 1, 1))
            torch.autograd.grad(F.cross_entropy(logits, y[:images].repeat(eot), reduction="sum"), x_adv)
        return go

    def evaluation():  # an attack of 0 steps: the clean images are also the "adversarial" batch
        evaluate_modes(hetpure, hetpure, [PGDEOT(eps=0.0, steps=0, eot=1)], x, y, torch.arange(32),
                       RunSpec(defense="hetpure", batch_size=32), ["single", "worst:5"], progress=False)

    print(f"attack step, 32 images, EOT 2: {median_seconds(attack_step(32, 2), args.repeats):.2f} s; "
          f"attack step, 8 images, EOT 4: {median_seconds(attack_step(8, 4), args.repeats):.2f} s; "
          f"evaluation single + worst:5 of 32 clean + 32 adversarial images: {median_seconds(evaluation, args.repeats):.2f} s")


if __name__ == "__main__":
    main()
