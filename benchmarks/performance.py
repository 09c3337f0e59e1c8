"""Performance figures P1-P5 (issue M8), measured side by side in one process; writes
reports/performance.md. Not part of the test suite (minutes of CPU):

    python benchmarks/performance.py --data ../shared/data/cifar10-jpeg [--repeats 3] [--batch 8]

(with the package installed, as the README installs it).

Models: pyautoattack's ResNet-18 and the embedded denoiser (the smoke setup), on the current
device. Every figure is the median over ``--repeats`` runs.
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch
import torch.nn.functional as F

from hetpure_bench.atomic import write_text_atomic
from hetpure_bench.classifiers import load_classifier
from hetpure_bench.data import load_cifar10
from hetpure_bench.defenses import build_defense
from hetpure_bench.diffusion.zoo import load_diffusion_model
from hetpure_bench.peak_memory import PeakMemory
from hetpure_bench.runner import device_name

ROOT = Path(__file__).resolve().parents[1]
CPU_MEMORY_CAVEAT = (
    "\nCaveat (CPU): the memory figures (P1c, P2) are process-RSS peaks measured one after another in "
    "one process; the allocator keeps freed memory, so a later measurement includes an earlier one's "
    "high-water mark and the networks loaded. P2 = 1 and P1c here are therefore NOT valid measurements "
    "yet; each memory figure needs its own process (to do)."
)


def timed(fn, device) -> tuple[float, float]:
    """(seconds, peak MiB) of one call."""
    with PeakMemory(device) as peak:
        started = time.perf_counter()
        fn()
        if device.type == "cuda":
            torch.cuda.synchronize()
        seconds = time.perf_counter() - started
    return seconds, peak.mib


def median_of(fn, device, repeats: int) -> tuple[float, float]:
    fn()  # warm-up
    runs = [timed(fn, device) for _ in range(repeats)]
    return statistics.median(s for s, _ in runs), statistics.median(m for _, m in runs)


def purification(defense, x):
    def go():
        with torch.no_grad():
            defense.reseed(0)
            defense.purify(x)
    return go


def attack_step(defense, x, y, eot: int = 1):
    """One full-gradient PGD-EOT step's forward and backward (the EOT copies in one batch)."""
    def go():
        defense.reseed(0)
        x_adv = x.clone().requires_grad_(True)
        loss = F.cross_entropy(defense(x_adv.repeat(eot, 1, 1, 1)), y.repeat(eot), reduction="sum")
        torch.autograd.grad(loss, x_adv)
    return go


def attack_step_looped(defense, x, y, eot: int):
    """The same gradient with a Python loop over the EOT samples (what batching replaces)."""
    def go():
        defense.reseed(0)
        x_adv = x.clone().requires_grad_(True)
        grad = torch.zeros_like(x)
        for _ in range(eot):
            loss = F.cross_entropy(defense(x_adv), y, reduction="sum")
            grad += torch.autograd.grad(loss, x_adv)[0]
    return go


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", default="../shared/data/cifar10-jpeg")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--out", default=str(ROOT / "reports" / "performance.md"))
    parser.add_argument("--skip-p5", action="store_true", help="skip the 3-minute default run")
    args = parser.parse_args()
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    classifier = load_classifier("resnet18-pyautoattack").to(device)
    diffusion = load_diffusion_model("embedded-denoiser").to(device)
    data = load_cifar10(args.data, split="test").subset(args.batch, 0)
    x, y = data.as_float().to(device), data.labels.to(device)
    build = lambda name, **kw: build_defense(name, classifier, diffusion, kw)  # noqa: E731
    r = args.repeats
    rows = []

    het, repaint = build("hetpure", stride=20), build("repaint", stride=20, resample_steps=20)
    het_p, het_pm = median_of(purification(het, x), device, r)
    rep_p, rep_pm = median_of(purification(repaint, x), device, r)
    het_a, het_am = median_of(attack_step(het, x, y), device, r)
    rep_a, rep_am = median_of(attack_step(repaint, x, y), device, r)
    rows += [
        ("P1a", f"hetpure / RePaint-style (U=20) wall time per purification (NFE {het.nfe} vs {repaint.nfe})",
         "<= 0.10", het_p / rep_p, f"{het_p:.2f} s / {rep_p:.2f} s"),
        ("P1b", "hetpure / RePaint-style (U=20) wall time per full-gradient attack step", "<= 0.10",
         het_a / rep_a, f"{het_a:.2f} s / {rep_a:.2f} s"),
        ("P1c", "hetpure / RePaint-style (U=20) peak memory of a full-gradient attack step", "<= 0.10",
         het_am / rep_am, f"{het_am:.0f} MiB / {rep_am:.0f} MiB (process RSS on CPU)" if device.type == "cpu"
         else f"{het_am:.0f} MiB / {rep_am:.0f} MiB"),
    ]

    fine, coarse = build("hetpure", stride=2), build("hetpure", stride=20)
    _, fine_m = median_of(attack_step(fine, x, y), device, r)
    _, coarse_m = median_of(attack_step(coarse, x, y), device, r)
    rows.append(("P2", f"peak memory of a full-gradient attack step, {fine.nfe}-step / {coarse.nfe}-step grid",
                 "<= 1.5", fine_m / coarse_m, f"{fine_m:.0f} MiB / {coarse_m:.0f} MiB"))

    t = torch.full((args.batch,), 100, device=device, dtype=torch.long)
    x_net = x * 2 - 1

    def network_pass():
        with torch.no_grad():
            diffusion(x_net, t)
    pass_s, _ = median_of(network_pass, device, max(r, 5))
    rows.append(("P3", "hetpure purification wall / (NFE x one network pass at the same batch)", "<= 1.10",
                 het_p / (het.nfe * pass_s), f"{het_p:.3f} s / ({het.nfe} x {pass_s:.4f} s)"))

    eot = 4
    batched, _ = median_of(attack_step(coarse, x, y, eot), device, r)
    looped, _ = median_of(attack_step_looped(coarse, x, y, eot), device, r)
    rows.append(("P4", f"PGD-EOT step throughput, batched EOT / Python loop (EOT {eot})", ">= 1.5",
                 looped / batched, f"{looped:.2f} s loop / {batched:.2f} s batched"))

    if not args.skip_p5:
        p5 = []
        for _ in range(r):
            with tempfile.TemporaryDirectory() as tmp:
                started = time.perf_counter()
                subprocess.run([sys.executable, "-m", "hetpure_bench", "run", "--defense", "hetpure", "--data", args.data,
                                "--leaderboard-dir", tmp], check=True, capture_output=True, cwd=ROOT,
                               env={**os.environ, "PYTHONPATH": str(ROOT)})
                p5.append(time.perf_counter() - started)
        rows.append(("P5", "wall time of the default `run --defense hetpure` (fresh store)", "<= 180 s",
                     statistics.median(p5), ", ".join(f"{s:.0f} s" for s in p5)))

    lines = [
        "# Performance (issue M8)\n",
        f"Measured by `python benchmarks/performance.py --data {args.data} --repeats {r} --batch {args.batch}` on "
        f"{device_name(device)}: pyautoattack's ResNet-18 and the embedded denoiser, {args.batch} JPEG CIFAR-10 test "
        f"images (seed 0). Each figure is the median of {r} runs after a warm-up.\n",
        "| figure | what | goal | measured | raw |",
        "|---|---|---|---|---|",
    ]
    for name, what, goal, value, raw in rows:
        lines.append(f"| {name} | {what} | {goal} | {value:.3g} | {raw} |")
    if device.type == "cpu":
        lines.append(CPU_MEMORY_CAVEAT)
    write_text_atomic(Path(args.out), "\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
