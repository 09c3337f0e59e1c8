"""P9 (issue M15): whole-command wall times of runs that share the cores, for one checkout.

    python benchmarks/threads.py --checkout . --label after --data ../shared/data/cifar10-jpeg
    python benchmarks/threads.py --checkout /path/to/older/checkout --label before ...

Cases (every run: `run --batch-size 4 --sanity-images 0`, defense `none` unless said, a fresh result store
per case, nothing else on the machine):
- alone: one run of 16 images;
- side by side: two such runs started together (seeds 1 and 2, one store), each one's wall time;
- single / torchrun: 32 images in one process, and under `torchrun --standalone --nproc_per_node=2`
  (defense ``--torchrun-defense``: with `none` the launcher's own start-up, a second torch import
  before the ranks start, is a visible part of a 10-second run; `hetpure` measures a real workload).
Each case is repeated ``--repeats`` times in turn (alone, side by side, single, torchrun, alone,
...) and its median quoted. The table is written as section "P9 LABEL" of reports/performance.md.
Goals: side by side <= 2.3x alone; torchrun 2 ranks no slower than 1 process.
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

from report_section import write_section  # benchmarks/ is on sys.path when a script here runs

ROOT = Path(__file__).resolve().parents[1]
BASE = ("run", "--batch-size", "4", "--sanity-images", "0")


def command(data: str, images: int, seed: int, out: str, launcher: tuple[str, ...] = (), defense: str = "none") -> list[str]:
    main = [*launcher, "-m", "hetpure_bench"] if launcher else [sys.executable, "-m", "hetpure_bench"]
    return [*main, *BASE, "--defense", defense, "-n", str(images), "--seed", str(seed), "--data", data, "--leaderboard-dir", out]


def wall_times(commands: list[list[str]], checkout: Path) -> list[float]:
    """Start the commands together; each one's wall seconds (a failed command stops the script)."""
    env = {**os.environ, "PYTHONPATH": str(checkout)}
    for name in ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "GOMP_SPINCOUNT", "OMP_WAIT_POLICY"):
        env.pop(name, None)  # the defaults of the checkout are what is measured
    started = time.perf_counter()
    processes = [subprocess.Popen(c, cwd=checkout, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE) for c in commands]
    seconds = []
    for process in processes:
        _, err = process.communicate()
        if process.returncode != 0:
            sys.exit(f"command failed ({process.returncode}): {' '.join(process.args)}\n{err.decode()[-2000:]}")
        seconds.append(time.perf_counter() - started)
    return seconds


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--checkout", default=str(ROOT), help="the hetpure_bench checkout to time (PYTHONPATH)")
    parser.add_argument("--label", default="after")
    parser.add_argument("--data", default=str(ROOT.parent / "shared" / "data" / "cifar10-jpeg"))
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--torchrun-defense", default="none", help="the defense of the single / torchrun cases")
    parser.add_argument("--out", default=str(ROOT / "reports" / "performance.md"))
    args = parser.parse_args()
    checkout = Path(args.checkout).resolve()
    torchrun = (sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2")
    heavy = args.torchrun_defense
    single, ranks2 = f"single ({heavy}, 32)", f"torchrun 2 ranks ({heavy}, 32)"
    times: dict[str, list[float]] = {"alone": [], "side by side": [], single: [], ranks2: []}
    for _ in range(args.repeats):
        with tempfile.TemporaryDirectory() as a, tempfile.TemporaryDirectory() as b, \
                tempfile.TemporaryDirectory() as c, tempfile.TemporaryDirectory() as d:
            times["alone"] += wall_times([command(args.data, 16, 1, a)], checkout)
            pair = wall_times([command(args.data, 16, 1, b), command(args.data, 16, 2, b)], checkout)
            times["side by side"].append(max(pair))
            times[single] += wall_times([command(args.data, 32, 0, c, defense=heavy)], checkout)
            times[ranks2] += wall_times([command(args.data, 32, 0, d, torchrun, heavy)], checkout)
    median = {case: statistics.median(seconds) for case, seconds in times.items()}
    side, torchrun_ratio = median["side by side"] / median["alone"], median[ranks2] / median[single]
    rows = "\n".join(f"| {case} | {median[case]:.1f} | {', '.join(f'{s:.1f}' for s in seconds)} |" for case, seconds in times.items())
    body = (
        f"## P9 {args.label}: runs sharing the cores (issue M15)\n\n"
        f"`python benchmarks/threads.py --checkout {args.checkout} --label {args.label} --repeats {args.repeats} "
        f"--torchrun-defense {heavy}` "
        f"(checkout at git {git_head(checkout)}), {os.cpu_count()} cores, nothing else running; "
        f"`{' '.join(BASE)}` on the JPEG CIFAR-10 copy, whole-command wall seconds (side by side: the slower of the two).\n\n"
        "| case | median s | runs s |\n|---|---|---|\n" + rows + "\n\n"
        f"- side by side / alone: **{side:.2f}** (goal <= 2.3)\n"
        f"- torchrun 2 ranks / single process: **{torchrun_ratio:.2f}** (goal <= 1.0)\n"
    )
    write_section(Path(args.out), f"P9 {args.label}", body)
    print(body)


def git_head(checkout: Path) -> str:
    result = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=checkout, capture_output=True, text=True)
    return result.stdout.strip() or "unknown"


if __name__ == "__main__":
    main()
