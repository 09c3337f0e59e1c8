"""Performance figures P1-P5 (issue M8), timed side by side in one process (memory figures each
in a fresh process); writes reports/performance.md. Not part of the test suite (minutes of CPU):

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
from hetpure_bench.peak_memory import PeakMemory, current_rss_bytes
from hetpure_bench.runner import device_name

ROOT = Path(__file__).resolve().parents[1]
MEMORY_NOTE = (
    "\nMemory (P1c, P2): each figure in a fresh process (the allocator keeps freed memory, so figures "
    "measured one after another in one process would include each other's high-water marks): the peak "
    "during one attack step minus the level just before it (networks and data loaded), process RSS on "
    "CPU, allocated memory on CUDA; one measurement each, not a median."
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


MEMORY_CASES = {  # defense settings of the memory figures, each measured in a process of its own
    "hetpure-stride20": ("hetpure", {"stride": 20}),
    "hetpure-stride2": ("hetpure", {"stride": 2}),
    "repaint-u20": ("repaint", {"stride": 20, "resample_steps": 20}),
}


# glibc keeps freed heap memory and fragments it, so process RSS overstates live memory; these
# settings make it map large blocks separately and return them at once.
GLIBC_RETURNS_MEMORY = {"MALLOC_MMAP_THRESHOLD_": "65536", "MALLOC_TRIM_THRESHOLD_": "0"}


def attack_step_memory(case: str, args, env: dict | None = None) -> tuple[float, float]:
    """(peak MiB above the level before the step, absolute peak MiB) of one full-gradient attack
    step, in a fresh process: in one process the allocator would keep an earlier figure's memory."""
    command = [sys.executable, __file__, "--memory-case", case, "--data", args.data, "--batch", str(args.batch)]
    out = subprocess.run(command, check=True, capture_output=True, text=True,
                         env={**os.environ, **(env or {})}).stdout.split()
    return float(out[-2]), float(out[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", default="../shared/data/cifar10-jpeg")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--out", default=str(ROOT / "reports" / "performance.md"))
    parser.add_argument("--skip-p5", action="store_true", help="skip the 3-minute default run")
    parser.add_argument("--memory-case", choices=sorted(MEMORY_CASES), help=argparse.SUPPRESS)
    args = parser.parse_args()
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    classifier = load_classifier("resnet18-pyautoattack").to(device)
    diffusion = load_diffusion_model("embedded-denoiser").to(device)
    data = load_cifar10(args.data, split="test").subset(args.batch, 0)
    x, y = data.as_float().to(device), data.labels.to(device)
    build = lambda name, **kw: build_defense(name, classifier, diffusion, kw)  # noqa: E731
    if args.memory_case:  # the child process of attack_step_memory
        name, settings = MEMORY_CASES[args.memory_case]
        before = current_rss_bytes() / 2**20 if device.type == "cpu" else torch.cuda.memory_allocated(device) / 2**20
        _, peak = timed(attack_step(build(name, **settings), x, y), device)
        print(peak - before, peak)
        return
    r = args.repeats
    rows = []

    het, repaint = build("hetpure", stride=20), build("repaint", stride=20, resample_steps=20)
    het_p, het_pm = median_of(purification(het, x), device, r)
    rep_p, rep_pm = median_of(purification(repaint, x), device, r)
    het_a, _ = median_of(attack_step(het, x, y), device, r)
    rep_a, _ = median_of(attack_step(repaint, x, y), device, r)
    (het_am, het_abs), (rep_am, rep_abs) = attack_step_memory("hetpure-stride20", args), attack_step_memory("repaint-u20", args)
    rows += [
        ("P1a", f"hetpure / RePaint-style (U=20) wall time per purification (NFE {het.nfe} vs {repaint.nfe})",
         "<= 0.10", het_p / rep_p, f"{het_p:.2f} s / {rep_p:.2f} s"),
        ("P1b", "hetpure / RePaint-style (U=20) wall time per full-gradient attack step", "<= 0.10",
         het_a / rep_a, f"{het_a:.2f} s / {rep_a:.2f} s"),
        ("P1c", "hetpure / RePaint-style (U=20) memory of a full-gradient attack step (peak above the level before it)",
         "<= 0.10", het_am / rep_am, f"{het_am:.0f} MiB / {rep_am:.0f} MiB (absolute peaks {het_abs:.0f} / {rep_abs:.0f} MiB)"),
    ]

    fine, coarse = build("hetpure", stride=2), build("hetpure", stride=20)
    (fine_m, fine_abs), (coarse_m, coarse_abs) = attack_step_memory("hetpure-stride2", args), (het_am, het_abs)
    rows.append(("P2", f"memory of a full-gradient attack step (peak above the level before it), {fine.nfe}-step / {coarse.nfe}-step grid",
                 "<= 1.5", fine_m / coarse_m, f"{fine_m:.0f} MiB / {coarse_m:.0f} MiB (absolute peaks {fine_abs:.0f} / {coarse_abs:.0f} MiB)"))
    if device.type == "cpu":
        (fine_g, _), (coarse_g, _) = (attack_step_memory(c, args, GLIBC_RETURNS_MEMORY) for c in ("hetpure-stride2", "hetpure-stride20"))
        rows.append(("P2'", "P2 with glibc returning freed memory at once (" + " ".join(f"{k}={v}" for k, v in GLIBC_RETURNS_MEMORY.items()) + ")",
                     "<= 1.5", fine_g / coarse_g, f"{fine_g:.0f} MiB / {coarse_g:.0f} MiB"))

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
    lines.append(MEMORY_NOTE)
    write_text_atomic(Path(args.out), "\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
