"""Command line: ``python -m hetpure_bench COMMAND``. Bad input exits 2 with one line on stderr."""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import warnings
from pathlib import Path

import yaml

from .atomic import write_text_atomic
from .errors import UserError
from .threads import configure as configure_threads

PROG = "hetpure_bench"


def _add_data_option(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--data",
        help="CIFAR-10 source: 'official' (download and cache), a folder of the official pickle "
        "batches, an image folder, or a .tar of class folders; default $HETPURE_DATA or 'official'",
    )


def _add_threads_option(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--threads", type=int, metavar="N",
                        help="intra-op CPU threads of this process (default: MKL_NUM_THREADS or OMP_NUM_THREADS "
                        "when set, else the cores this process may use, shared by torchrun's local processes)")


def _add_output_options(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--leaderboard-dir", default="leaderboards")
    parser.add_argument("--store", help="the SQLite result store (default LEADERBOARD_DIR/results.sqlite); "
                        "rerunning a command computes only what is not in it yet")
    parser.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"],
                        help="auto: this process's GPU when there is one (torchrun: LOCAL_RANK), else the CPU")
    parser.add_argument("--no-checkpointing", action="store_true",
                        help="keep every network call's activations for the attack's backward pass instead of "
                        "recomputing them: faster (about 1.5x per attack step on CPU at smoke scale), the same "
                        "results bit for bit, but memory grows with the number of network calls")
    _add_threads_option(parser)


def cmd_list(args: argparse.Namespace) -> int:
    from .attacks import ATTACKS
    from .data import OFFICIAL_BATCHES, OFFICIAL_FOLDER, resolve_data_spec
    from .defenses import DEFENSES, load_entry_point_defenses
    from .models.cache import hetpure_home
    from .models.classifiers import CLASSIFIERS
    from .models.diffusion_zoo import DIFFUSION_MODELS

    cached = hetpure_home() / "cifar10" / OFFICIAL_FOLDER
    official_ready = all((cached / n).exists() for names in OFFICIAL_BATCHES.values() for n in names)
    spec = resolve_data_spec(None)
    print("datasets:")
    print(f"  official     cifar10-official  {'cached at ' + str(cached) if official_ready else 'downloads on first use (needs internet)'}")
    if spec != "official":
        print(f"  $HETPURE_DATA {spec}  {'exists' if Path(spec).exists() else 'MISSING'}")
    for title, registry in (("classifiers", CLASSIFIERS), ("diffusion models", DIFFUSION_MODELS)):
        print(f"{title}:")
        for entry in registry:
            state = "available offline" if entry.available() else "not available offline"
            print(f"  {entry.name:<24} {state:<22} {entry.info.get('architecture', '')}")
        if registry is CLASSIFIERS:
            print(f"  {'robustbench:<Name>[@L2]':<24} {'downloads when needed':<22} any RobustBench CIFAR-10 zoo model")
    load_entry_point_defenses()
    print("defenses:")
    for entry in DEFENSES:
        print(f"  {entry.name:<24} {entry.info.get('summary', entry.info.get('source', ''))}")
    print("attacks:")
    for entry in ATTACKS:
        print(f"  {entry.name:<24} {entry.info.get('summary', '')}")
    return 0


def cmd_train_denoiser(args: argparse.Namespace) -> int:
    from .models.training import TrainConfig, export_ema, train_denoiser

    config = TrainConfig(
        out_dir=args.out, data=args.data, steps=args.steps, batch_size=args.batch_size,
        lr=args.lr, t_max=args.t_max, seed=args.seed, checkpoint_every=args.checkpoint_every,
    )
    last = train_denoiser(config)
    dest = Path(args.export or Path(args.out) / "denoiser.safetensors")
    info = export_ema(last, dest)
    print(f"EMA weights after {info['steps']} steps written to {dest}")
    return 0


def cmd_export_denoiser(args: argparse.Namespace) -> int:
    from .models.training import export_ema

    info = export_ema(Path(args.checkpoint), Path(args.dest))
    print(json.dumps(info))
    return 0


def cmd_eval_denoiser(args: argparse.Namespace) -> int:
    from .data import load_cifar10
    from .diffusion.denoiser_quality import evaluate_denoiser
    from .diffusion.networks import load_unet_safetensors
    from .models.classifiers import classifier_entry, load_classifier
    from .models.diffusion_zoo import DIFFUSION_MODELS, load_diffusion_model

    # Check names and data before loading any network.
    classifier_entry(args.classifier)
    if not args.weights:
        DIFFUSION_MODELS.get(args.diffusion_model)
    data = load_cifar10(args.data, split="test").subset(args.n, args.seed)
    if args.weights:
        model, model_label = load_unet_safetensors(Path(args.weights)), str(args.weights)
    else:
        model, model_label = load_diffusion_model(args.diffusion_model), args.diffusion_model
    classifier = load_classifier(args.classifier)
    result = evaluate_denoiser(
        model, classifier, data.as_float(), data.labels, args.psnr_t, args.purify_t,
        args.purify_stride, args.seed,
    )
    result.update(
        data_source=data.source, split="test", images=len(data), subset_seed=args.seed,
        noise_seed=args.seed, classifier=args.classifier, diffusion_model=model_label,
        sampler=f"DDIM eta=0 from t={args.purify_t}, stride {args.purify_stride}",
    )
    print(f"# Denoiser quality: {model_label} on {len(data)} {data.source} test images (seed {args.seed})")
    print("| t | PSNR noisy input (dB) | PSNR one-step x0 prediction (dB) |")
    print("|---|---|---|")
    for t, row in result["one_step_psnr_db"].items():
        print(f"| {t} | {row['noisy_input']:.2f} | {row['x0_prediction']:.2f} |")
    print(
        f"\n{args.classifier} alone: {100 * result['accuracy_alone']:.1f}%   after {result['sampler']} "
        f"({result['network_calls']} network calls): {100 * result['accuracy_purified']:.1f}% "
        f"(PSNR of purified images {result['purified_psnr_db']:.2f} dB)"
    )
    if args.out:
        write_text_atomic(Path(args.out), json.dumps(result, indent=2) + "\n")
    return 0


def _parse_setting(text: str, option: str) -> tuple[str, object]:
    key, sep, value = text.partition("=")
    if not sep or not key:
        raise UserError(f"{option} needs KEY=VALUE, got {text!r}")
    try:
        return key, yaml.safe_load(value)
    except yaml.YAMLError:
        return key, value


def cmd_run(args: argparse.Namespace) -> int:
    from .bench.spec import preset_sibling

    specs = _run_specs(args, args.preset)
    if args.dry_run and preset_sibling(args.preset):  # a paper preset: show both protocol families
        sibling = preset_sibling(args.preset)
        _execute(specs, args)
        print(f"\n--- sibling preset {sibling} ---")
        return _execute(_run_specs(args, sibling), args)
    return _execute(specs, args)


def _run_specs(args: argparse.Namespace, preset: str) -> list:
    """The rows of ``run``: one spec per defense, the preset's settings under the command line's."""
    from .bench.spec import load_preset, spec_from_preset
    from .defenses import DEFENSES, load_entry_point_defenses

    load_entry_point_defenses()
    if args.defense is None:  # the defenses the preset configures
        names = list((load_preset(preset).get("defenses") or {})) or ["hetpure"]
    elif args.defense == "all":
        names = DEFENSES.names()
    else:
        names = [n.strip() for n in args.defense.split(",") if n.strip()]
    attack = {k: v for k, v in {
        "name": args.attack, "steps": args.steps, "step_size": args.step_size, "eot": args.eot,
        "random_start": args.random_start, "mask_aware": args.mask_aware,
    }.items() if v is not None}
    attack.update(_parse_setting(s, "--attack-arg") for s in args.attack_arg)
    sanity = {"images": args.sanity_images} if args.sanity_images is not None else None
    return [
        spec_from_preset(
            preset, name, classifier=args.classifier, diffusion_model=args.diffusion_model,
            data=args.data, n_images=args.n, seed=args.seed, eval_seed=args.eval_seed, threat=args.threat, eps=args.eps,
            gradient=args.gradient, evaluation=args.evaluation, batch_size=args.batch_size,
            attack=attack, defense_overrides=dict(_parse_setting(s, "--defense-arg") for s in args.defense_arg),
            sanity=sanity,
        )
        for name in names
    ]


def _execute(specs: list, args: argparse.Namespace) -> int:
    """Check every row, load what they need, then run them through the result store."""
    from .bench import distributed
    from .bench.phase_times import PhaseTimes
    from .bench.runner import load, run
    from .bench.spec import validate
    from .bench.store import ResultStore
    from .diffusion.sampling import activation_checkpointing
    from .reporting.leaderboard import write_leaderboards

    for spec in specs:  # every row's input is checked before the first one runs
        validate(spec)
    if getattr(args, "dry_run", False):
        from .bench.dry_run import print_estimates

        print_estimates(specs)
        return 0
    ranks = distributed.ranks_from_env()
    device = distributed.device_for(ranks, args.device)
    leaderboard_dir = Path(args.leaderboard_dir)
    store_path = Path(args.store) if args.store else leaderboard_dir / "results.sqlite"
    for directory in {leaderboard_dir, store_path.parent}:
        _check_writable(directory)
    cache: dict = {}
    phases = PhaseTimes()
    with phases.phase("loading"):
        for spec in specs:  # data and every checkpoint, so that a missing or corrupt one fails first
            load(spec, device, cache, progress=ranks.is_main)
    distributed.init(ranks, device)
    # Only rank 0 opens the main store; every rank of a distributed run has its own shard.
    store = ResultStore(store_path) if ranks.is_main else None
    shard = ResultStore(ranks.shard_path(store_path)) if ranks.distributed else None
    try:
        with activation_checkpointing(not args.no_checkpointing):  # bit-identical either way: not in the setup
            for i, spec in enumerate(specs, 1):
                if len(specs) > 1 and ranks.is_main:
                    print(f"row {i} of {len(specs)}: {spec.defense}")
                rows = run(spec, store, cache=cache, ranks=ranks, device=device, shard=shard, phases=phases)
                if rows:
                    with phases.phase("leaderboard"):
                        write_leaderboards(store, leaderboard_dir)
                for row in rows:
                    _report(row, leaderboard_dir, store_path)
        if ranks.is_main:
            print(phases.summary())
    finally:
        if store is not None:
            store.close()
        if shard is not None:
            shard.delete() if shard.is_empty() else shard.close()
        distributed.finish(ranks)
    return 0


def cmd_sweep(args: argparse.Namespace) -> int:
    from .bench.spec import load_preset, spec_from_preset

    sweeps = load_preset(args.preset).get("sweeps") or {}
    if args.name not in sweeps:
        raise UserError(f"preset {args.preset!r} has no sweep {args.name!r} (it has: {', '.join(sorted(sweeps)) or 'none'})")
    sweep = sweeps[args.name]
    sanity = {"images": args.sanity_images} if args.sanity_images is not None else sweep.get("sanity")
    specs = [
        spec_from_preset(args.preset, sweep["defense"], data=args.data, n_images=args.n or sweep.get("n_images"),
                         seed=args.seed, defense_overrides=point, sanity=sanity)
        for point in sweep["points"]
    ]
    return _execute(specs, args)


def cmd_study(args: argparse.Namespace) -> int:
    from .bench.protocol_study import step_result, study_modes, study_steps, transitions
    from .bench.store import ResultStore
    from .reporting.protocol_study import study_section, write_staircase

    steps = study_steps(args.defense, args.preset, data=args.data)
    if not args.no_run:
        _execute([spec for step in steps for spec in step.specs], args)
    store_path = Path(args.store) if args.store else Path(args.leaderboard_dir) / "results.sqlite"
    if not store_path.is_file():
        raise UserError(f"no result store at {store_path}: run the study without --no-run first")
    modes = study_modes(steps)
    with ResultStore(store_path) as store:
        rows = store.rows()
        results = [step_result(store, step, rows, modes) for step in steps]
    figure = write_staircase(args.defense, results, modes, Path(args.figure or f"protocol-{args.defense}.png"))
    print(study_section(args.defense, results, transitions(results, modes), modes,
                        f"preset {args.preset}, store {store_path}", str(figure)))
    return 0


REPORT_STORES = {"reference": "leaderboards/reference/results.sqlite"}  # other names: leaderboards/results.sqlite


def cmd_report(args: argparse.Namespace) -> int:
    from .bench.store import ResultStore
    from .reporting.report import write_report

    store_path = Path(args.store or REPORT_STORES.get(args.name, "leaderboards/results.sqlite"))
    if not store_path.is_file():
        raise UserError(f"no result store at {store_path}: run a benchmark first (or pass --store)")
    with ResultStore(store_path) as store:
        rows = store.rows()
        if not rows:
            raise UserError(f"the result store {store_path} holds no finished rows")
        if args.images:
            _image_grid(args, Path(args.out) / args.name / "images.png")
        if args.name == "reference":
            from .reporting.reference_report import write_reference_report

            path = write_reference_report(rows, Path(args.out), str(store_path), store)
        else:
            path = write_report(rows, args.name, Path(args.out), str(store_path), store=store)
    print(f"report: {path} ({len(rows)} rows from {store_path})")
    return 0


def cmd_compare(args: argparse.Namespace) -> int:
    from .bench.store import ResultStore
    from .reporting.comparison import compare_text

    store_path = Path(args.store)
    if not store_path.is_file():
        raise UserError(f"no result store at {store_path}: run a benchmark first (or pass --store)")
    with ResultStore(store_path) as store:
        print(compare_text(store, args.row_a, args.row_b, args.mode))
    return 0


def _image_grid(args: argparse.Namespace, path: Path) -> None:
    from .bench import distributed
    from .bench.spec import spec_from_preset, validate
    from .reporting.image_grid import grid_caption, image_panels
    from .reporting.plots import image_grid_plot

    specs = [spec_from_preset(args.preset, name.strip(), data=args.data) for name in args.image_defenses.split(",")]
    for spec in specs:
        validate(spec)
    from tqdm.auto import tqdm

    device, cache = distributed.device_for(distributed.Ranks(), "auto"), {}
    # Each defense's panels attack its images first: seconds to minutes per defense.
    panels = {spec.defense: image_panels(spec, args.images, device, cache)
              for spec in tqdm(specs, desc="report: image grid", unit="defense")}
    image_grid_plot(panels, path, caption=grid_caption(specs[0], args.images))


def _report(row: dict, leaderboard_dir: Path, store_path: Path) -> None:
    from .bench.n_evaluation import n_evaluation_lines
    from .bench.rows import convergence_warning
    from .reporting.accuracy_cells import accuracy_cell

    print(
        f"{row['defense']} [{row['defense_config']}] | {row['classifier']} + {row['diffusion_model']} | "
        f"{row['data_source']}, {row['n_images']} images, seed {row['seed']} | {row['attack']}, "
        f"{row['threat']} eps {row['eps']}, gradient {row['gradient_mode']} | evaluation {row['evaluation']}"
    )
    print(
        f"clean {accuracy_cell(row, 'clean')}  robust {accuracy_cell(row, 'robust')} "
        f"(%, {row.get('interval_method', 'no interval')}, n = {row['n_images']})  NFE {row['nfe']}  "
        f"wall {row['wall_s']:.1f} s ({row['images_per_s']:.3g} images/s, peak {row['peak_mem_mib']} MiB, "
        f"{row['device']})  sanity checks {row['sanity_wall_s']:.1f} s"
    )
    if row["robust_by_attack"] != "-":
        print(f"per attack (robust %): {row['robust_by_attack']}")
    for line in n_evaluation_lines(row):
        print(line)
    if row.get("attack_s_by_attack", "-") != "-":
        print(f"attack seconds per attack: {row['attack_s_by_attack']}")
    if row["sanity"] not in ("ok", "not run"):
        print(f"WARNING: {row['defense']}: sanity check {row['sanity']}", file=sys.stderr)
    if convergence_warning(row):
        print(f"WARNING: {row['defense']}: {convergence_warning(row)}", file=sys.stderr)
    print(f"leaderboard: {leaderboard_dir}; per-image results: {store_path} (setup {row['setup_hash'][:12]})")


def _check_writable(directory: Path) -> None:
    try:
        directory.mkdir(parents=True, exist_ok=True)
        with tempfile.NamedTemporaryFile(dir=directory, prefix=".write-test-"):  # unique: ranks probe at once
            pass
    except OSError as exc:
        raise UserError(f"cannot write to {directory}: {exc.strerror}") from None


class OneLineParser(argparse.ArgumentParser):
    """argparse, except that a usage error is one line (no usage block) and exit code 2."""

    def error(self, message: str):
        print(f"{self.prog}: error: {message} (see --help)", file=sys.stderr)
        sys.exit(2)


def build_parser() -> argparse.ArgumentParser:
    parser = OneLineParser(prog=PROG, description="Benchmark of diffusion-based adversarial purification.")
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    p = commands.add_parser("list", help="datasets, classifiers and diffusion models, and what is available offline")
    p.set_defaults(func=cmd_list)

    p = commands.add_parser("run", help="attack defenses, keep every result in the store, regenerate the leaderboard")
    p.add_argument("--defense",
                   help="registered defense name (see 'list'), a comma-separated list, or 'all'; "
                   "several defenses run on the same images and attack, sharing the networks "
                   "(default: the defenses the preset configures)")
    p.add_argument("--dry-run", action="store_true",
                   help="print network calls and estimated hours per row (from a measured network "
                   "pass on this device) and exit without running")
    p.add_argument("--preset", default="smoke", help="shipped YAML preset giving the defaults (default smoke)")
    p.add_argument("--classifier")
    p.add_argument("--diffusion-model")
    _add_data_option(p)
    p.add_argument("-n", "--num-images", dest="n", type=int)
    p.add_argument("--seed", type=int)
    p.add_argument("--eval-seed", type=int, metavar="N",
                   help="seed of the evaluation noise (default: --seed): judges the adversarial examples "
                   "stored by a run of the same setup again under new noise, without attacking")
    p.add_argument("--threat", choices=["Linf", "L2"])
    p.add_argument("--eps", help="attack budget, e.g. 8/255 (Linf) or 0.5 (L2)")
    p.add_argument("--attack", help="pgd-eot, apgd-eot, diffattack, diffhammer, autoattack, torchattacks, suite, or hetpure's "
                   "adaptive attacks mask-aware-apgd (through the relaxed attention mask), mask-avoiding-apgd (perturbs "
                   "off the mask only) and hetpure-adaptive (their suite with plain APGD-EOT) (default: the preset's); "
                   "the preset's settings for that attack apply")
    p.add_argument("--attack-arg", action="append", default=[], metavar="KEY=VALUE",
                   help="attack setting, e.g. version=rand (autoattack) or attack=CW (torchattacks); repeatable")
    p.add_argument("--steps", type=int, help="attack iterations (of a suite: every member)")
    p.add_argument("--step-size", type=float, help="PGD-EOT step size")
    p.add_argument("--eot", type=int, help="EOT samples per iteration (PGD-EOT, APGD-EOT, AutoAttack; of a suite: every member)")
    p.add_argument("--random-start", action="store_true", default=None)
    p.add_argument("--mask-aware", type=float, nargs="?", const=0.05, metavar="TEMPERATURE",
                   help="mask-aware adaptive attack on hetpure: differentiate a sigmoid relaxation of "
                   "the attention mask (temperature, default 0.05)")
    p.add_argument("--gradient", help="'full', 'surrogate:K' or 'bpda'")
    p.add_argument("--evaluation", help="'single', 'vote:m', 'worst:N' or 'expected:K', or several separated "
                   "by commas (one attack, one row per mode)")
    p.add_argument("--sanity-images", type=int, help="images for the sanity checks (0: skip them)")
    p.add_argument("--batch-size", type=int)
    p.add_argument("--defense-arg", action="append", default=[], metavar="KEY=VALUE",
                   help="defense setting, e.g. t_l=150 or mask.tau=0.85 (repeatable)")
    _add_output_options(p)
    p.set_defaults(func=cmd_run)

    p = commands.add_parser("sweep", help="run a preset's strength sweep (one row per point) for the report's plots")
    p.add_argument("name", help="the sweep's name in the preset (smoke: diffpure-t-star, hetpure-tl-ts)")
    p.add_argument("--preset", default="smoke")
    _add_data_option(p)
    p.add_argument("-n", "--num-images", dest="n", type=int, help="default: the sweep's")
    p.add_argument("--seed", type=int)
    p.add_argument("--sanity-images", type=int, help="default: the sweep's")
    _add_output_options(p)
    p.set_defaults(func=cmd_sweep)

    p = commands.add_parser("report", help="write reports/NAME/report.md with tables and figures from the result store")
    p.add_argument("--name", default="smoke", help="smoke (the generic report) or reference (the reference "
                   "leaderboard with its headline, the protocol study and the published numbers)")
    p.add_argument("--store", help="default: leaderboards/reference/results.sqlite for --name reference, else "
                   "leaderboards/results.sqlite")
    p.add_argument("--out", default="reports", help="reports folder (default reports)")
    p.add_argument("--images", type=int, default=0, metavar="N",
                   help="also draw the image grid for N images (runs the attack on them; needs --data)")
    p.add_argument("--image-defenses", default="hetpure,diffpure,repaint", help="defenses in the image grid")
    p.add_argument("--preset", default="smoke", help="settings of the image grid's defenses and attack")
    _add_data_option(p)
    _add_threads_option(p)
    p.set_defaults(func=cmd_report)

    p = commands.add_parser("study", help="protocol-inflation study: the authors' protocol, then one choice "
                            "changed per step, on the same images, with paired differences")
    p.add_argument("kind", choices=["protocol"], help="the study (protocol: steps a-d of bench/protocol_study.py)")
    p.add_argument("--defense", default="hetpure")
    p.add_argument("--preset", default="cpu-reference")
    _add_data_option(p)
    p.add_argument("--no-run", action="store_true", help="only tabulate what the store holds (missing steps: pending)")
    p.add_argument("--figure", help="where to write the staircase figure (default protocol-DEFENSE.png)")
    _add_output_options(p)
    p.set_defaults(func=cmd_study, leaderboard_dir="leaderboards/reference")

    p = commands.add_parser("compare", help="paired comparison of two rows on the same images: the difference of "
                            "their accuracies with its interval and an exact McNemar test")
    p.add_argument("row_a", metavar="ROW_A", help="a setup hash prefix (>= 6 hex characters, :MODE when the setup "
                   "has several evaluation modes) or labels like defense=hetpure,attack=...,evaluation=single "
                   "(any row columns; exactly one row must have them)")
    p.add_argument("row_b", metavar="ROW_B", help="the same, for the row A is compared with (differences are A - B)")
    p.add_argument("--store", default="leaderboards/results.sqlite")
    p.add_argument("--mode", help="evaluation mode of both rows when a name does not say")
    p.set_defaults(func=cmd_compare)

    p = commands.add_parser("train-denoiser", help="train (or resume) the small eps-prediction denoiser")
    p.add_argument("--out", required=True, help="run folder; rerunning with the same folder resumes")
    _add_data_option(p)
    p.add_argument("--steps", type=int, default=20000, help="total optimiser steps (default 20000)")
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--lr", type=float, default=5e-4)
    p.add_argument("--t-max", type=int, default=300, help="train on t in 0..t_max-1 (default 300)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--checkpoint-every", type=int, default=200)
    p.add_argument("--export", help="where to write the EMA safetensors (default OUT/denoiser.safetensors)")
    _add_threads_option(p)
    p.set_defaults(func=cmd_train_denoiser)

    p = commands.add_parser("export-denoiser", help="write the EMA weights of a training checkpoint as safetensors")
    p.add_argument("checkpoint", help="the run's last.pt")
    p.add_argument("dest", help="output .safetensors path")
    p.set_defaults(func=cmd_export_denoiser)

    p = commands.add_parser("eval-denoiser", help="one-step PSNR and DDIM-purified accuracy of a denoiser")
    _add_data_option(p)
    p.add_argument("--diffusion-model", default="embedded-denoiser")
    p.add_argument("--weights", help="evaluate this safetensors file instead of a registered model")
    p.add_argument("--classifier", default="resnet18-pyautoattack")
    p.add_argument("-n", "--num-images", dest="n", type=int, default=512)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--psnr-t", type=int, nargs="+", default=[100, 200])
    p.add_argument("--purify-t", type=int, default=100)
    p.add_argument("--purify-stride", type=int, default=10)
    p.add_argument("--out", help="also write the result as JSON here")
    _add_threads_option(p)
    p.set_defaults(func=cmd_eval_denoiser)
    return parser


def main(argv: list[str] | None = None) -> int:
    # Import-time deprecation notices of dependencies (torch.jit, robustbench's pkg_resources) are
    # not the user's business and would bury the one-line errors.
    warnings.filterwarnings("ignore", category=FutureWarning, module=r"torch\.jit")
    warnings.filterwarnings("ignore", message="pkg_resources is deprecated", category=UserWarning)
    args = build_parser().parse_args(argv)
    try:
        if "threads" in vars(args):  # the commands that compute: before they first import torch
            configure_threads(args.threads)
        return args.func(args)
    except UserError as exc:
        print(f"{PROG}: error: {' '.join(str(exc).split())}", file=sys.stderr)  # always one line
        return 2
    except KeyboardInterrupt:
        print(f"{PROG}: interrupted", file=sys.stderr)
        return 130
