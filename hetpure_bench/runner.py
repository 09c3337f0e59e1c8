"""The benchmark runner: one defense, one attack, some evaluation modes, on a seeded image subset.

Every batch's results are committed to the result store (store.py) before the next batch starts;
rows and leaderboards are built from the store. Noise discipline: see evaluate_batch.
"""

from __future__ import annotations

import dataclasses
import hashlib
import time
from dataclasses import dataclass, field
from importlib import resources
from typing import Any

import pandas as pd
import torch
import yaml
from tqdm.auto import tqdm

from .attacks import attack_label, build_attacks, mask_temperature
from .attacks.base import Attack
from .attacks.gradients import attack_model, check_mask_aware, parse_gradient_mode
from .attacks.threat import check_threat, perturbation_size
from .classifiers import classifier_entry, load_classifier
from .data import load_cifar10
from .defenses import DEFENSES, build_defense, defense_config, load_entry_point_defenses
from .defenses.base import Defense
from .diffusion.zoo import DIFFUSION_MODELS, load_diffusion_model
from .errors import UserError
from .distributed import Ranks, all_gather, barrier, gather_to_main
from .evaluation import combine, parse_evaluation_mode, purification_passes
from .noise import image_seeds
from .peak_memory import PeakMemory
from .sanity import SanityConfig, run_sanity_checks, summarise
from .store import ResultStore, setup_hash


def parse_eps(value: Any) -> float:
    """A float, or a fraction written "8/255"."""
    try:
        if isinstance(value, str) and "/" in value:
            numerator, denominator = value.split("/")
            return float(numerator) / float(denominator)
        return float(value)
    except (ValueError, ZeroDivisionError):
        raise UserError(f"eps must be a number or a fraction like 8/255, got {value!r}") from None


@dataclass
class RunSpec:
    defense: str
    classifier: str = "resnet18-pyautoattack"
    diffusion_model: str = "embedded-denoiser"
    data: str | None = None
    n_images: int = 32
    seed: int = 0
    threat: str = "Linf"
    eps: float = 8 / 255
    attack: dict = field(default_factory=lambda: {"name": "pgd-eot"})
    gradient: str = "full"
    evaluation: str = "single"
    batch_size: int = 32
    defense_overrides: dict = field(default_factory=dict)
    sanity: dict = field(default_factory=dict)
    preset: str = "smoke"


def load_preset(name: str) -> dict:
    path = resources.files("hetpure_bench") / "presets" / f"{name}.yaml"
    if not path.is_file():
        known = sorted(p.name[:-5] for p in resources.files("hetpure_bench").joinpath("presets").iterdir() if p.name.endswith(".yaml"))
        raise UserError(f"unknown preset {name!r} (known: {', '.join(known)})")
    return yaml.safe_load(path.read_text())


def spec_from_preset(preset: str, defense: str, **overrides: Any) -> RunSpec:
    """A RunSpec from a shipped preset, with command-line values (not None) taking precedence."""
    settings = load_preset(preset)
    defense_overrides = dict((settings.pop("defenses", None) or {}).get(defense, {}))
    # A preset may give a defense its own diffusion model (GDMP uses Ho et al.'s DDPM).
    if "diffusion_model" in defense_overrides:
        settings["diffusion_model"] = defense_overrides.pop("diffusion_model")
    defense_overrides.update(overrides.pop("defense_overrides", None) or {})
    # The preset names its attack and keeps settings per attack, so that choosing another
    # attack on the command line picks up the preset's settings for that one.
    settings.pop("sweeps", None)  # used by the sweep command only
    per_attack = settings.pop("attacks", None) or {}
    requested = dict(overrides.pop("attack", None) or {})
    name = requested.pop("name", None) or settings.get("attack", "pgd-eot")
    settings.pop("attack", None)
    attack = {"name": name, **(per_attack.get(name) or {}), **requested}
    settings.update({k: v for k, v in overrides.items() if v is not None})
    settings["eps"] = parse_eps(settings.get("eps", 8 / 255))
    return RunSpec(defense=defense, attack=attack, defense_overrides=defense_overrides, preset=preset, **settings)


def validate(spec: RunSpec) -> None:
    """Every check that needs no network or data, so bad input fails before heavy work."""
    load_entry_point_defenses()
    defense_cls = DEFENSES.build(spec.defense)
    config = defense_config(spec.defense, spec.defense_overrides, spec.threat)
    classifier_entry(spec.classifier)
    if defense_cls.needs_diffusion:
        DIFFUSION_MODELS.get(spec.diffusion_model)
    check_threat(spec.threat, spec.eps)
    if spec.n_images < 1 or spec.batch_size < 1:
        raise UserError("n_images and batch_size must be >= 1")
    parse_gradient_mode(spec.gradient)
    evaluation_modes(spec)
    build_attacks(spec.attack, spec.threat, spec.eps, spec.seed)
    if mask_temperature(spec.attack) is not None:
        check_mask_aware(spec.gradient, spec.defense, config)
    sanity_config(spec)


def sanity_config(spec: RunSpec) -> SanityConfig:
    try:
        return SanityConfig(**spec.sanity)
    except TypeError as exc:
        raise UserError(f"bad sanity setting: {exc}") from None


def attack_and_evaluate(
    defense: Defense,
    target: torch.nn.Module,
    attacks: list[Attack],
    images: torch.Tensor,
    labels: torch.Tensor,
    indices: torch.Tensor,
    spec: RunSpec,
    progress: bool = True,
) -> pd.DataFrame:
    """Per-image results of ``defense`` under the spec's one evaluation mode (see evaluate_batch)."""
    frames = evaluate_modes(defense, target, attacks, images, labels, indices, spec, [spec.evaluation], progress)
    return frames[spec.evaluation]


def evaluate_modes(
    defense: Defense,
    target: torch.nn.Module,
    attacks: list[Attack],
    images: torch.Tensor,
    labels: torch.Tensor,
    indices: torch.Tensor,
    spec: RunSpec,
    modes: list[str],
    progress: bool = True,
) -> dict[str, pd.DataFrame]:
    """evaluate_batch over the images in batches of ``spec.batch_size``; per-image frames per mode."""
    records: dict[str, list] = {mode: [] for mode in modes}
    for start in tqdm(range(0, len(labels), spec.batch_size), desc=f"{spec.defense}: attack + evaluate",
                      unit="batch", disable=not progress):
        stop = start + spec.batch_size
        batch, _ = evaluate_batch(defense, target, attacks, images[start:stop], labels[start:stop],
                                  indices[start:stop], spec.seed, modes, progress)
        for mode in modes:
            records[mode].extend(batch[mode])
    return {mode: pd.DataFrame(rows) for mode, rows in records.items()}


def evaluate_batch(
    defense: Defense,
    target: torch.nn.Module,
    attacks: list[Attack],
    x: torch.Tensor,
    y: torch.Tensor,
    indices: torch.Tensor,
    seed: int,
    modes: list[str],
    progress: bool = False,
) -> tuple[dict[str, list[dict]], dict]:
    """Attack one batch once, then judge the same adversarial examples under each evaluation mode.

    Per mode, per image: clean and adversarial predictions of ``defense``; ``target`` is what
    the attacks differentiate (the defense itself, its surrogate, BPDA, ...). An image is robust
    when its clean prediction and its prediction on every attack's example are correct (per-image
    worst case over the attacks); ``adv_pred`` is the prediction on the first example that broke
    it. Noise comes from per-image streams seeded from (seed, image index, purpose): the attack's
    passes and the evaluation use different purposes, so the attacker never sees the evaluation
    noise, and the clean and every adversarial evaluation share theirs (common random numbers:
    at eps = 0 the adversarial predictions equal the clean ones exactly). The modes share their
    purifications ("single" is the first pass of "worst:N"). Also returns the seconds spent
    attacking ("attack_s") and evaluating ("eval_s" per mode: the seconds of its own passes).
    """
    attack_seeds, evaluate_seeds = image_seeds(seed, indices, "attack"), image_seeds(seed, indices, "evaluate")
    started = time.perf_counter()
    examples = []
    for attack in attacks:
        for module in {defense, target}:
            module.reseed(attack_seeds)
        x_adv = attack.perturb(target, x, y, progress=progress)
        if (perturbation_size(x_adv - x, attack.norm) > attack.eps * (1 + 1e-5) + 1e-7).any() or x_adv.min() < 0 or x_adv.max() > 1:
            raise RuntimeError(f"{attack.name} left the {attack.norm} eps-ball or the [0,1] box")  # a bug, never a result
        examples.append(x_adv)
    cost = {"attack_s": time.perf_counter() - started, "eval_s": dict.fromkeys(modes, 0.0)}
    passes = {mode: parse_evaluation_mode(mode)[1] for mode in modes}
    per_input = []
    for inputs in [x, *examples]:
        defense.reseed(evaluate_seeds)  # so pass k is the same in every mode: the modes share passes
        predictions, seconds = purification_passes(defense, inputs, max(passes.values()))
        per_input.append(predictions)
        for mode in modes:  # each mode is charged its own passes
            cost["eval_s"][mode] += sum(seconds[:passes[mode]])
    records = {}
    for mode in modes:
        labels = [combine(mode, predictions, y) for predictions in per_input]
        records[mode] = _records(labels[0], labels[1:], y, indices)
    return records, cost


def _records(clean: torch.Tensor, adversarial: list[torch.Tensor], y: torch.Tensor, indices: torch.Tensor) -> list[dict]:
    records = []
    for i in range(len(y)):
        survived = [bool(pred[i] == y[i]) for pred in adversarial]
        broken = [pred[i] for pred in adversarial if pred[i] != y[i]]
        record = {
            "index": int(indices[i]), "label": int(y[i]),
            "clean_pred": int(clean[i]), "adv_pred": int(broken[0] if broken else adversarial[-1][i]),
            "clean_correct": bool(clean[i] == y[i]),
            "robust_correct": bool(clean[i] == y[i] and all(survived)),
        }
        if len(adversarial) > 1:
            record.update({f"robust_correct_{k}": bool(clean[i] == y[i] and ok) for k, ok in enumerate(survived)})
        records.append(record)
    return records


def evaluation_modes(spec: RunSpec) -> list[str]:
    """The row's evaluation modes: one, or several separated by commas ("single,worst:5"),
    which then judge the same adversarial examples and give one row each."""
    modes = [m.strip() for m in str(spec.evaluation).split(",") if m.strip()]
    for mode in modes:
        parse_evaluation_mode(mode)
    if not modes or len(set(modes)) != len(modes):
        raise UserError(f"evaluation {spec.evaluation!r} must name each mode once")
    return modes


# Part of every setup hash: bump when a change of the code changes results (2: per-image noise
# streams), so a store never mixes results of different code.
RESULTS_VERSION = 2


@dataclass
class Loaded:
    """What a row runs on, loaded once per invocation and shared between its rows."""

    data: Any
    classifier: torch.nn.Module
    diffusion: torch.nn.Module | None


def load(spec: RunSpec, device: torch.device, cache: dict) -> Loaded:
    def cached(key, loader):
        if key not in cache:
            cache[key] = loader()
        return cache[key]

    data = cached(("data", spec.data, spec.n_images, spec.seed),
                  lambda: load_cifar10(spec.data, split="test").subset(spec.n_images, spec.seed))
    classifier = cached(("classifier", spec.classifier, device), lambda: load_classifier(spec.classifier).to(device))
    diffusion = None
    if DEFENSES.build(spec.defense).needs_diffusion:
        diffusion = cached(("diffusion", spec.diffusion_model, device),
                           lambda: load_diffusion_model(spec.diffusion_model).to(device))
    return Loaded(data, classifier, diffusion)


def setup_record(spec: RunSpec, loaded: Loaded, defense: Defense, attacks: list[Attack], device: torch.device) -> dict:
    """Every setting that can change a result: the store's key (its sha256) and the row's labels."""
    return {
        "results_version": RESULTS_VERSION,
        "defense": spec.defense,
        "defense_config": defense.describe() or "-",
        "classifier": spec.classifier,
        "diffusion_model": diffusion_label(spec.diffusion_model, loaded.diffusion),
        "data_source": loaded.data.source,
        "image_indices_sha256": hashlib.sha256(loaded.data.index.numpy().tobytes()).hexdigest(),
        "threat": spec.threat,
        "eps": f"{spec.eps:.6g}",
        "attack": attack_label(attacks, mask_temperature(spec.attack)),
        "attack_settings": spec.attack,
        "gradient_mode": spec.gradient,
        "evaluation_modes": evaluation_modes(spec),
        "n_images": len(loaded.data),
        "seed": spec.seed,
        "batch_size": spec.batch_size,  # AutoAttack's results depend on the batch (noise.py)
        "sanity": dataclasses.asdict(sanity_config(spec)),
        "device_type": device.type,  # CPU and GPU kernels round differently
        "preset": spec.preset,
    }


def run(
    spec: RunSpec,
    store: ResultStore | None,
    progress: bool = True,
    cache: dict | None = None,
    ranks: Ranks = Ranks(),
    device: torch.device = torch.device("cpu"),
    shard: ResultStore | None = None,
) -> list[dict]:
    """Run one benchmark setup through the result store; returns its rows (one per evaluation
    mode) on rank 0 and [] on other ranks.

    ``store`` is the main result store, opened by rank 0 only (None on other ranks); in a
    distributed run every rank commits to its own ``shard`` store (distributed.py), whose copy
    of this setup is dropped once rank 0 has merged it.

    Batches already in the store (or in this rank's shard file) are skipped, so rerunning after
    a crash computes only what is missing. ``cache`` (a dict kept by the caller) shares loaded
    data and networks between the rows of one invocation.
    """
    validate(spec)
    loaded = load(spec, device, {} if cache is None else cache)
    defense = build_defense(spec.defense, loaded.classifier, loaded.diffusion, spec.defense_overrides, spec.seed, spec.threat)
    target = attack_model(defense, spec.gradient, mask_temperature(spec.attack))
    attacks = build_attacks(spec.attack, spec.threat, spec.eps, spec.seed)
    setup = setup_record(spec, loaded, defense, attacks, device)
    key = setup_hash(setup)

    shard = shard if ranks.distributed else store
    for s in {store, shard} - {None}:
        s.register(key, setup)
    mine = _my_batches(spec, len(loaded.data), key, store, shard, ranks)
    images, labels, indices = loaded.data.as_float(), loaded.data.labels, loaded.data.index
    label = f"{spec.defense}" + (f" [rank {ranks.rank}/{ranks.world_size}]" if ranks.distributed else "")
    for start in tqdm(mine, desc=f"{label}: attack + evaluate", unit="batch", disable=not progress):
        stop = start + spec.batch_size
        with PeakMemory(device) as peak:
            records, cost = evaluate_batch(
                defense, target, attacks, images[start:stop].to(device), labels[start:stop].to(device),
                indices[start:stop], spec.seed, setup["evaluation_modes"], progress,
            )
        shard.commit_batch(key, start, records, {**cost, "peak_mib": peak.mib, "device": device_name(device), "rank": ranks.rank})
    if ranks.distributed:
        _merge_shards(key, store, shard, ranks)
        barrier(ranks)  # rank 0 has committed every batch: the shards' copies can go
        shard.forget(key)
        if not ranks.is_main:
            return []
    return finish_rows(key, setup, store, loaded, defense, target, attacks, spec, device)


def _my_batches(spec: RunSpec, n: int, key: str, store: ResultStore | None, shard: ResultStore, ranks: Ranks) -> list[int]:
    """The batches this rank computes: those in no store yet, dealt round-robin over the ranks."""
    done = shard.done_batches(key) | (store.done_batches(key) if store is not None else set())
    done = set().union(*all_gather(ranks, done))
    starts = range(0, n, spec.batch_size)
    pending = [s for s in starts if s not in done]
    if done and ranks.is_main:
        print(f"{spec.defense}: {len(starts) - len(pending)} of {len(starts)} batches already in the store"
              + (", computing the rest" if pending else ""))
    return pending[ranks.rank::ranks.world_size]


def _merge_shards(key: str, store: ResultStore | None, shard: ResultStore, ranks: Ranks) -> None:
    """Rank 0 commits every rank's batches of this setup into the main store."""
    gathered = gather_to_main(ranks, shard.batches(key))
    if gathered is None:
        return
    have = store.done_batches(key)
    for batches in gathered:
        for start, records, cost in batches:
            if start not in have:
                store.commit_batch(key, start, records, cost)
                have.add(start)


def finish_rows(key, setup, store, loaded, defense, target, attacks, spec, device) -> list[dict]:
    """Sanity checks (once per setup, kept in the store) and the rows, built from the store."""
    modes = setup["evaluation_modes"]
    frames = {mode: store.per_image(key, mode) for mode in modes}
    if len(frames[modes[0]]) != len(loaded.data):
        raise RuntimeError(f"store {store.path} holds {len(frames[modes[0]])} of {len(loaded.data)} results")
    stored = store.sanity(key)
    if stored is None:
        started = time.perf_counter()
        checks = sanity_checks(defense, target, attacks, loaded.classifier, loaded.data.as_float().to(device),
                               loaded.data.labels.to(device), loaded.data.index, spec, frames)
        stored = {m: [dataclasses.asdict(c) for c in cs] for m, cs in checks.items()}, time.perf_counter() - started
        store.save_sanity(key, *stored)
    checks, sanity_wall = stored
    costs = store.batch_costs(key)
    rows = {mode: make_row(setup, mode, frames[mode], costs, checks[mode], sanity_wall, defense.nfe, attacks) for mode in modes}
    store.save_rows(key, rows)
    return [{**row, "setup_hash": key} for row in rows.values()]


def make_row(setup: dict, mode: str, per_image: pd.DataFrame, costs: list[dict], checks: list[dict],
             sanity_wall: float, nfe: int, attacks: list[Attack]) -> dict:
    """One leaderboard row: the setup's labels, the accuracies and what the row cost."""
    # What this row would cost alone: the (shared) attack plus its own evaluation, summed over
    # batches (device-seconds: in a sharded run, the sum over the ranks).
    wall = sum(c["attack_s"] + c["eval_s"][mode] for c in costs)
    return {
        **{k: setup[k] for k in ("defense", "defense_config", "classifier", "diffusion_model", "data_source",
                                 "threat", "eps", "attack", "gradient_mode", "n_images", "seed", "preset")},
        "evaluation": mode,
        "clean_acc": float(per_image["clean_correct"].mean()),
        "robust_acc": float(per_image["robust_correct"].mean()),
        "robust_by_attack": robust_by_attack(per_image, attacks),
        "nfe": nfe,
        "wall_s": round(wall, 2),
        "images_per_s": round(len(per_image) / wall, 4) if wall > 0 else float("nan"),
        "peak_mem_mib": round(max(c["peak_mib"] for c in costs)),
        "device": " + ".join(sorted({c["device"] for c in costs})),
        "sanity": summarise(checks) if checks else "not run",
        "sanity_checks": checks,
        "sanity_wall_s": round(sanity_wall, 1),
    }


def device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    threads = torch.get_num_threads()
    return f"cpu ({threads} thread{'s' if threads != 1 else ''})"


def diffusion_label(name: str, diffusion) -> str:
    """The model name, with its training step when its weights say (the embedded denoiser)."""
    if diffusion is None:
        return "-"
    steps = (getattr(diffusion, "metadata", None) or {}).get("steps")
    return f"{name}@{steps}" if steps else name


def robust_by_attack(per_image: pd.DataFrame, attacks: list[Attack]) -> str:
    """Each attack's own robust accuracy (%) when a row has several ("-" otherwise); the row's
    robust_acc is the per-image worst case, never above the minimum of these."""
    if len(attacks) < 2:
        return "-"
    return "; ".join(f"{a.name} {100 * per_image[f'robust_correct_{k}'].mean():.1f}" for k, a in enumerate(attacks))


def sanity_checks(
    defense, target, attacks, classifier, images, labels, indices, spec: RunSpec, frames: dict[str, pd.DataFrame]
) -> dict[str, list]:
    """Per evaluation mode, the sanity checks on the first ``sanity.images`` images of the row
    (sanity.py); the row's own results (``frames``) are the full-budget reference."""
    config, modes = sanity_config(spec), list(frames)
    n = min(config.images, len(labels))
    if n == 0:
        return {mode: [] for mode in modes}
    x, y, index = images[:n], labels[:n], indices[:n]
    slice_spec = dataclasses.replace(spec, batch_size=n)
    memo: dict = {}

    def evaluate_all(attacks_, other_defense=None, other_target=None):
        key = (tuple(attacks_), type(other_defense).__name__, type(other_target).__name__)
        if key not in memo:  # every mode judges the same examples: attack once
            memo[key] = evaluate_modes(
                defense if other_defense is None else other_defense, target if other_target is None else other_target,
                attacks_, x, y, index, slice_spec, modes, progress=False,
            )
        return memo[key]

    checks = {}
    for mode in modes:
        full = frames[mode].iloc[:n].reset_index(drop=True)
        evaluate = lambda attacks_, d=None, t=None, mode=mode: evaluate_all(attacks_, d, t)[mode]  # noqa: E731
        checks[mode] = run_sanity_checks(evaluate, full, attacks, target, classifier, x, y, spec.threat, config)
    return checks
