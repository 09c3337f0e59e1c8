"""P7 (issue M11): one DiffHammer iteration (N = 10) against one EOT-10 full-gradient PGD step on
the same images. Not part of the test suite; writes section "P7" of reports/performance.md:

    python benchmarks/diffhammer_timing.py --data ../shared/data/cifar10-jpeg [--defense hetpure] \
        [--defense-arg stride=20] [--batch 8] [--repeats 3]

One DiffHammer iteration is ``DiffHammer.evaluate(..., gradient=True)``: the N purifications as
one batched pass without a graph, N classifier backprops, the EM step, and one purifier backprop
through the representative (recomputed from its replayed noise). One EOT-10 step is PGD-EOT's
loss over 10 batched copies and its input gradient through every purification. Both use the
defense's default checkpointing. Goal: the ratio <= 0.25. Models: the smoke setup (pyautoattack's
ResNet-18, the embedded denoiser) on the current device; medians over ``--repeats`` after a warm-up.
"""

from __future__ import annotations

import argparse
import statistics
import time
from pathlib import Path

import torch
from report_section import write_section  # benchmarks/ is on sys.path when a script here runs

from hetpure_bench.attacks.diffhammer import DiffHammer
from hetpure_bench.attacks.pgd_eot import PGDEOT
from hetpure_bench.bench.runner import device_name
from hetpure_bench.data import load_cifar10
from hetpure_bench.defenses import build_defense
from hetpure_bench.models.classifiers import load_classifier
from hetpure_bench.models.diffusion_zoo import load_diffusion_model

READING = """Reading: the ratio has a floor near 0.25 + what the representative costs. A DiffHammer
iteration runs the N purifications once without a graph (N forwards), N classifier backprops,
and one purification of one copy with a graph (forward, the checkpointed recomputation and the
backward: about 4 forwards); an EOT-N step runs N copies with a graph (about 4N forwards). With
the purification's cost dominating, the ratio is about (N + 4) / 4N = 0.35 at N = 10, and 0.25
only if the representative's backprop were free. Uncheckpointing the replay (one copy's whole
graph) would save one forward of one copy and multiply its memory by the number of network calls;
it is not done."""


def _median_seconds(fn, repeats: int) -> float:
    fn()  # warm-up
    times = []
    for _ in range(repeats):
        if torch.cuda.is_available():
            torch.cuda.synchronize()
        started = time.perf_counter()
        fn()
        if torch.cuda.is_available():
            torch.cuda.synchronize()
        times.append(time.perf_counter() - started)
    return statistics.median(times)


def _setting(text: str) -> tuple[str, object]:
    key, _, value = text.partition("=")
    try:
        return key, int(value)
    except ValueError:
        return key, value


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", default="../shared/data/cifar10-jpeg")
    parser.add_argument("--defense", default="hetpure")
    parser.add_argument("--defense-arg", action="append", default=[], help="KEY=VALUE (default for hetpure: stride=20)")
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--n", type=int, default=10, help="DiffHammer's purifications and PGD's EOT copies")
    parser.add_argument("--out", default=str(Path(__file__).resolve().parents[1] / "reports" / "performance.md"))
    args = parser.parse_args()

    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    classifier = load_classifier("resnet18-pyautoattack").to(device)
    diffusion = load_diffusion_model("embedded-denoiser").to(device)
    data = load_cifar10(args.data, split="test").subset(args.batch, 0)
    x, y = data.as_float().to(device), data.labels.to(device)
    overrides = dict(map(_setting, args.defense_arg)) or ({"stride": 20} if args.defense == "hetpure" else {})
    defense = build_defense(args.defense, classifier, diffusion, overrides, seed=list(range(args.batch)))

    hammer = DiffHammer(purifications=args.n)
    pgd = PGDEOT(eot=args.n)

    def hammer_iteration():
        hammer.evaluate(defense, x, y, "margin", gradient=True)

    def eot_step():
        pgd.eot_pass(defense, x, y)

    seconds = {"hammer": _median_seconds(hammer_iteration, args.repeats), "eot": _median_seconds(eot_step, args.repeats)}
    ratio = seconds["hammer"] / seconds["eot"]
    body = "\n".join([
        "## P7: one DiffHammer iteration vs one EOT full-gradient step (issue M11)\n",
        f"`python benchmarks/diffhammer_timing.py --defense {args.defense} --batch {args.batch} --repeats {args.repeats} "
        f"--n {args.n}` on {device_name(device)}: {args.defense} {overrides} ({defense.nfe} network calls), the first "
        f"{args.batch} JPEG CIFAR-10 test images drawn with seed 0, medians of {args.repeats} after a warm-up.\n",
        f"| figure | DiffHammer iteration (N = {args.n}) s | EOT-{args.n} full-gradient step s | ratio | goal |",
        "|---|---|---|---|---|",
        f"| P7 | {seconds['hammer']:.3f} | {seconds['eot']:.3f} | {ratio:.2f} | <= 0.25 ({'met' if ratio <= 0.25 else 'not met'}) |\n",
        READING,
    ])
    write_section(Path(args.out), "P7", body)
    print(body)


if __name__ == "__main__":
    main()
