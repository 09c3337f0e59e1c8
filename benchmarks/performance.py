"""Performance figures P1-P5 (issue M8), measured side by side in one process; writes
reports/performance.md. Not part of the test suite (about 20 minutes of CPU):

    python benchmarks/performance.py --data ../shared/data/cifar10-jpeg [--repeats 3] [--batch 8] [--options]

(with the package installed, as the README installs it). ``--options`` adds the speed-ups that
were measured and not adopted (channels-last, torch.compile, no checkpointing, inference_mode).

Models: pyautoattack's ResNet-18 and the embedded denoiser (the smoke setup), on the current
device. Times are medians over ``--repeats`` runs after a warm-up. Memory is the peak of live
tensor bytes during one attack step (``peak_memory.peak_tensor_bytes``, the CPU counterpart of
CUDA's max_memory_allocated), which does not depend on what the allocator kept from earlier work;
process RSS, which does, is given for P2 too, each figure from a fresh process.
"""

from __future__ import annotations

import argparse
import copy
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

# torch.compile (an option measured below) would otherwise leave a pool of compile workers that
# compete with the timings for the two cores.
os.environ.setdefault("TORCHINDUCTOR_COMPILE_THREADS", "1")

import pandas as pd  # noqa: E402
import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402
from report_section import write_section  # benchmarks/ is on sys.path when a script here runs

from hetpure_bench.bench.peak_memory import PeakMemory, current_rss_bytes, peak_tensor_bytes
from hetpure_bench.bench.runner import device_name
from hetpure_bench.data import load_cifar10
from hetpure_bench.defenses import build_defense
from hetpure_bench.diffusion.sampling import activation_checkpointing
from hetpure_bench.models.classifiers import load_classifier
from hetpure_bench.models.diffusion_zoo import load_diffusion_model
from hetpure_bench.reporting.leaderboard import markdown_table

ROOT = Path(__file__).resolve().parents[1]
READING = """
## Reading

- P1a, P1b: hetpure's time saving is its number of network calls (10 against 190), and the
  sampler adds little beyond the network (P3).
- P1c cannot meet its goal while P2 meets its own, and should not: the runner checkpoints every
  network call, so an attack step keeps each call's input (one image batch) and, at its peak, one
  call's activations and the classifier's, whatever the number of calls. Peak memory is then
  nearly the same for 10 and 190 calls. The paper's "about 90% saved" is a property of the whole
  graph, whose memory grows with the calls: P1c' measures that and meets the goal. Checkpointing
  stays the default because it keeps memory flat (P2); it costs one more network forward per call,
  and `run --no-checkpointing` trades that memory for the speed (options: bit-identical results).
- P2 by process RSS is larger than by live tensors because glibc keeps freed heap blocks; with
  glibc told to return them (second RSS row) the RSS ratio falls towards the live-tensor ratio.
- P4: batching the EOT copies pays while one copy's pass does not keep both cores busy (1 or 2
  images per batch); at 8 images the loop already fills the cores, the batched pass does the same
  arithmetic, and what remains is one attention-mask pass per image instead of per copy.
- P6 is asked for a GPU; none was available to this task, so it is the CPU's estimate (it
  shows why the paper presets need one).
"""
EOT = 4
P4_BATCHES = (1, 2, 8)

# glibc keeps freed heap memory and fragments it, so process RSS overstates live memory; these
# settings make it map large blocks separately and return them at once.
GLIBC_RETURNS_MEMORY = {"MALLOC_MMAP_THRESHOLD_": "65536", "MALLOC_TRIM_THRESHOLD_": "0"}
RSS_CASES = {"hetpure-stride2": {"stride": 2}, "hetpure-stride20": {"stride": 20}}


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def seconds_of(fn, device: torch.device) -> float:
    started = time.perf_counter()
    fn()
    sync(device)
    return time.perf_counter() - started


def paired(first, second, device: torch.device, repeats: int) -> tuple[float, float, float]:
    """(median seconds of ``first``, of ``second``, median of the per-round ratio first / second),
    the two timed in alternation after a warm-up of each: this machine's speed drifts by tens of
    percent over minutes, and alternating keeps the drift out of the ratio."""
    first(), second()
    rounds = [(seconds_of(first, device), seconds_of(second, device)) for _ in range(repeats)]
    return (statistics.median(a for a, _ in rounds), statistics.median(b for _, b in rounds),
            statistics.median(a / b for a, b in rounds))


def peak_mib(fn, device: torch.device) -> float:
    return peak_tensor_bytes(fn, device) / 2**20


def purification(defense, x):
    def go():
        with torch.no_grad():
            defense.reseed(0)
            defense.purify(x)
    return go


def attack_step(defense, x, y, eot: int = 1):
    """One full-gradient PGD-EOT step's forward and backward (the EOT copies in one batch, as
    attacks/pgd_eot.py does)."""
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


def without_checkpointing(fn):
    def go():
        with activation_checkpointing(False):
            fn()
    return go


def cli(*args: str) -> str:
    """Run ``python -m hetpure_bench ARGS`` on this checkout; its standard output."""
    return subprocess.run([sys.executable, "-m", "hetpure_bench", *args], check=True, capture_output=True, text=True,
                          cwd=ROOT, env={**os.environ, "PYTHONPATH": str(ROOT)}).stdout


def rss_growth(case: str, args, env: dict | None = None) -> float:
    """Process RSS growth (MiB) during one full-gradient attack step, in a fresh process: in one
    process the allocator would keep an earlier figure's memory."""
    command = [sys.executable, __file__, "--rss-case", case, "--data", args.data, "--batch", str(args.batch)]
    out = subprocess.run(command, check=True, capture_output=True, text=True, env={**os.environ, **(env or {})}).stdout
    return float(out.split()[-1])


def setup(args):
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    classifier = load_classifier("resnet18-pyautoattack").to(device)
    diffusion = load_diffusion_model("embedded-denoiser").to(device)
    data = load_cifar10(args.data, split="test").subset(max(args.batch, 32, *P4_BATCHES), 0)
    x, y = data.as_float().to(device), data.labels.to(device)
    return device, classifier, diffusion, x, y


def main_figures(args, device, classifier, diffusion, x_all, y_all) -> list[tuple]:
    r, b = args.repeats, args.batch
    x, y = x_all[:b], y_all[:b]
    build = lambda name, **kw: build_defense(name, classifier, diffusion, kw)  # noqa: E731
    het, repaint = build("hetpure", stride=20), build("repaint", stride=20, resample_steps=20)
    fine = build("hetpure", stride=2)
    rows = []

    het_p, rep_p, purification_ratio = paired(purification(het, x), purification(repaint, x), device, r)
    het_a, rep_a, step_ratio = paired(attack_step(het, x, y), attack_step(repaint, x, y), device, r)
    het_m, rep_m, fine_m = (peak_mib(attack_step(d, x, y), device) for d in (het, repaint, fine))
    # The paper's "about 90% saved" holds for the whole graph, whose memory grows with the calls;
    # checkpointing (the runner's setting) keeps memory flat in the calls, so there the ratio is ~1.
    small = slice(0, 2)  # 190 calls' activations at batch 8 would take several GiB
    het_g, rep_g = (peak_mib(without_checkpointing(attack_step(d, x[small], y[small])), device) for d in (het, repaint))
    rows += [
        ("P1a", f"hetpure / RePaint-style (U=20) wall time per purification (NFE {het.nfe} vs {repaint.nfe})",
         "<= 0.10", purification_ratio, f"{het_p:.2f} s / {rep_p:.2f} s"),
        ("P1b", "hetpure / RePaint-style (U=20) wall time per full-gradient attack step", "<= 0.10",
         step_ratio, f"{het_a:.2f} s / {rep_a:.2f} s"),
        ("P1c", "hetpure / RePaint-style (U=20) peak memory of a full-gradient attack step, network calls checkpointed (the runner)",
         "<= 0.10", het_m / rep_m, f"{het_m:.1f} MiB / {rep_m:.1f} MiB"),
        ("P1c'", "the same without checkpointing (the whole graph kept, as in the paper's comparison; 2 images)",
         "<= 0.10", het_g / rep_g, f"{het_g:.1f} MiB / {rep_g:.1f} MiB"),
        ("P2", f"peak memory of a full-gradient attack step, {fine.nfe}-step / {het.nfe}-step grid", "<= 1.5",
         fine_m / het_m, f"{fine_m:.1f} MiB / {het_m:.1f} MiB"),
    ]
    if device.type == "cpu":
        for label, env in (("", None), (", glibc returning freed memory", GLIBC_RETURNS_MEMORY)):
            fine_rss, coarse_rss = (rss_growth(case, args, env) for case in ("hetpure-stride2", "hetpure-stride20"))
            rows.append(("P2 (RSS)", f"P2 by process RSS growth (fresh processes{label})", "<= 1.5",
                         fine_rss / coarse_rss, f"{fine_rss:.0f} MiB / {coarse_rss:.0f} MiB"))

    t, x_net = torch.full((b,), 100, device=device, dtype=torch.long), x * 2 - 1

    def network_only():  # the purification's network calls alone, back to back like in the loop
        with torch.no_grad():
            for _ in range(het.nfe):
                diffusion(x_net, t)
    het_p, network_s, ratio = paired(purification(het, x), network_only, device, max(r, 5))
    rows.append(("P3", "hetpure purification wall / (NFE x one network pass at the same batch)", "<= 1.10",
                 ratio, f"{het_p:.3f} s / ({het.nfe} x {network_s / het.nfe:.4f} s)"))

    for images in P4_BATCHES:
        xb, yb = x_all[:images], y_all[:images]
        looped, batched, ratio = paired(attack_step_looped(het, xb, yb, EOT), attack_step(het, xb, yb, EOT), device, r)
        rows.append(("P4", f"PGD-EOT step throughput, batched EOT / Python loop (EOT {EOT}, {images} image{'s' * (images > 1)})",
                     ">= 1.5", ratio, f"{looped:.2f} s loop / {batched:.2f} s batched"))

    if not args.skip_p5:
        p5 = []
        for _ in range(r):
            with tempfile.TemporaryDirectory() as tmp:
                started = time.perf_counter()
                cli("run", "--defense", "hetpure", "--data", args.data, "--leaderboard-dir", tmp)
                p5.append(time.perf_counter() - started)
        rows.append(("P5", "wall time of the default `run --defense hetpure` (fresh store)", "<= 180 s",
                     statistics.median(p5), ", ".join(f"{s:.0f} s" for s in p5)))

    dry_run = cli("run", "--preset", "paper-wrn28-linf", "--defense", "hetpure", "--dry-run").strip().splitlines()[-1]
    hours = dry_run.strip("| ").split(" | ")[-1]
    rows.append(("P6", "estimated wall time of the hetpure row of the `paper-wrn28-linf` preset on this device "
                 "(`run --preset paper-wrn28-linf --defense hetpure --dry-run`: measured network passes x calls)",
                 "- (the issue asks it of a GPU)", float(hours.split()[0].replace(",", "")), f"{hours} hours"))
    return rows


def option_figures(args, device, classifier, diffusion, x_all, y_all) -> list[tuple]:
    """Speed-ups measured and not adopted: their gain, and what they change in the numbers."""
    r, x, y = args.repeats, x_all[:args.batch], y_all[:args.batch]
    eot = 2  # the smoke preset's attack step
    het = build_defense("hetpure", classifier, diffusion, {"stride": 20})
    step = attack_step(het, x, y, eot)
    rows = []

    def speedup(name: str, option, adopted=step, changes: str = "none") -> None:
        option_s, adopted_s, ratio = paired(option, adopted, device, r)
        rows.append((name, f"{1 / ratio:.2f}", f"{option_s:.2f} s vs {adopted_s:.2f} s", changes))

    def deviation_from_adopted(defense) -> str:
        with torch.no_grad():
            het.reseed(0), defense.reseed(0)
            deviation = (defense(x) - het(x)).abs().max().item()
        if deviation == 0:
            return "none seen: the logits of the images bit-identical"
        return f"logits move by up to {deviation:.1e}: results may change"

    def inference_mode_purification():
        with torch.inference_mode():
            het.reseed(0)
            het.purify(x)
    speedup("inference_mode instead of no_grad (purification only)", inference_mode_purification, purification(het, x))
    speedup("no activation checkpointing (opt-in: run --no-checkpointing)", without_checkpointing(step),
            changes="none (bit-identical gradients); memory grows with the calls (P1c')")
    smoke = attack_step(het, x_all[:32], y_all[:32], eot)  # the smoke preset's batch: 32 images
    speedup("no activation checkpointing, 32 images (the smoke batch)", without_checkpointing(smoke), smoke,
            "none; memory grows with the calls")

    fast = build_defense("hetpure", copy.deepcopy(classifier).to(memory_format=torch.channels_last),
                         copy.deepcopy(diffusion).to(memory_format=torch.channels_last), {"stride": 20})
    speedup("channels-last weights and inputs", attack_step(fast, x.contiguous(memory_format=torch.channels_last), y, eot),
            changes=deviation_from_adopted(fast))

    compiled = build_defense("hetpure", classifier, torch.compile(diffusion), {"stride": 20})
    first = seconds_of(attack_step(compiled, x, y, eot), device)
    speedup(f"torch.compile of the denoiser (first call {first:.0f} s)", attack_step(compiled, x, y, eot),
            changes=deviation_from_adopted(compiled))
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", default="../shared/data/cifar10-jpeg")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--out", default=str(ROOT / "reports" / "performance.md"))
    parser.add_argument("--skip-p5", action="store_true", help="skip the default runs (3 minutes each)")
    parser.add_argument("--options", action="store_true", help="also measure the speed-ups not adopted")
    parser.add_argument("--rss-case", choices=sorted(RSS_CASES), help=argparse.SUPPRESS)
    args = parser.parse_args()
    device, classifier, diffusion, x, y = setup(args)
    if args.rss_case:  # the child process of rss_growth
        defense = build_defense("hetpure", classifier, diffusion, RSS_CASES[args.rss_case])
        before = current_rss_bytes()
        with PeakMemory(device) as peak:
            attack_step(defense, x[:args.batch], y[:args.batch])()
        print(peak.mib - before / 2**20)
        return
    rows = main_figures(args, device, classifier, diffusion, x, y)
    lines = [
        "# Performance (issue M8)\n",
        f"Measured by `python benchmarks/performance.py --data {args.data} --repeats {args.repeats} --batch {args.batch}"
        f"{' --options' if args.options else ''}` on {device_name(device)}: pyautoattack's ResNet-18 and the embedded "
        f"denoiser, JPEG CIFAR-10 test images (the first {args.batch} of the 32 drawn with seed 0, unless a row says "
        "otherwise). "
        f"Times are medians of {args.repeats} runs after a warm-up; "
        "the two sides of a time ratio are timed in alternation and the ratio is the median of the rounds' ratios. Memory is the peak of live tensor bytes allocated "
        "during one attack step (the CPU counterpart of CUDA's max_memory_allocated; one measurement, it does not vary); "
        "the RSS rows are process resident memory, each from a fresh process.\n",
        markdown_table(pd.DataFrame([[name, what, goal, f"{value:.3g}" if value < 1000 else f"{value:,.0f}", raw] for name, what, goal, value, raw in rows],
                                    columns=["figure", "what", "goal", "measured", "raw"])),
        READING if device.type == "cpu" else "",
    ]
    if args.options:
        lines += [
            f"\n## Speed-ups measured and not adopted\n\nOne full-gradient hetpure attack step (10 calls, {args.batch} "
            f"images, EOT 2) unless a row says otherwise; option and adopted code timed in alternation, {args.repeats} "
            "rounds; speed-up = the median over rounds of adopted time / option's time.\n",
            markdown_table(pd.DataFrame(option_figures(args, device, classifier, diffusion, x, y),
                                        columns=["option", "speed-up", "time", "what it changes in the numbers"])),
        ]
    write_section(Path(args.out), "M8", "\n".join(lines))  # P7, P9 and P5 (fresh clone) are other scripts' sections
    print("\n".join(lines))


if __name__ == "__main__":
    main()
