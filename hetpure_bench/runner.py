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
from torch import nn
from tqdm.auto import tqdm

from .attacks import applicable, attack_label, build_attacks, mask_temperature, suite_name
from .attacks.base import Attack
from .attacks.convergence import combined_counts, converged, tail_change
from .attacks.gradients import attack_model, check_mask_aware, parse_gradient_mode
from .attacks.threat import check_threat, perturbation_size
from .classifiers import classifier_entry, load_classifier
from .data import load_cifar10
from .defenses import DEFENSES, build_defense, defense_config, load_entry_point_defenses
from .defenses.base import Defense
from .diffusion.zoo import DIFFUSION_MODELS, load_diffusion_model
from .errors import UserError
from .distributed import Ranks, all_gather, barrier, gather_to_main
from .evaluation import judged_labels, outcomes, parse_evaluation_mode, purification_passes
from .n_evaluation import n_evaluation_fields
from .noise import image_seeds
from .peak_memory import PeakMemory
from .phase_times import PhaseTimes
from .sanity import SanityConfig, check_names, run_sanity_checks, summarise
from .statistics import accuracy_interval
from .store import ResultStore, StoredExamples, setup_hash
from .stored_examples import decode, encode
from .stored_histories import encode as encode_history
from .stored_histories import robust_counts


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
    seed: int = 0  # the defense's and the attack's noise
    data_seed: int | None = None  # the image subset's RandomState seed (None: ``seed``)
    eval_seed: int | None = None  # the evaluation noise's seed; None: the run's seed
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


def preset_sibling(name: str) -> str | None:
    """The other protocol family of a paper preset: ``P-reference`` (the authors' own evaluation)
    for ``P`` (the strongest protocol) and back; None when there is no such preset."""
    other = name[: -len("-reference")] if name.endswith("-reference") else f"{name}-reference"
    return other if (resources.files("hetpure_bench") / "presets" / f"{other}.yaml").is_file() else None


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
    if spec.eval_seed is not None and (type(spec.eval_seed) is not int or spec.eval_seed < 0):
        raise UserError(f"eval seed must be an integer >= 0, got {spec.eval_seed!r}")
    parse_gradient_mode(spec.gradient)
    evaluation_modes(spec)
    row_attacks(spec, placeholder_defense(spec))
    if mask_temperature(spec.attack) is not None:
        check_mask_aware(spec.gradient, spec.defense, config)
    sanity_config(spec)


def placeholder_defense(spec: RunSpec) -> Defense:
    """The spec's defense around placeholder networks: its configuration and NFE without loading
    any weights (checks and estimates before the real networks load)."""
    return build_defense(spec.defense, nn.Identity(), nn.Identity(), spec.defense_overrides, spec.seed, spec.threat)


def row_attacks(spec: RunSpec, defense: Defense) -> tuple[list[Attack], list[Attack]]:
    """The row's attacks that can run against ``defense`` and the suite members skipped
    (attacks.applicable)."""
    return applicable(build_attacks(spec.attack, spec.threat, spec.eps, spec.seed), spec.attack, defense, spec.gradient)


def evaluation_seed(spec: RunSpec) -> int:
    """The seed of the evaluation noise: the eval seed when given, else the run's seed."""
    return spec.seed if spec.eval_seed is None else spec.eval_seed


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
        batch, _, _, _ = evaluate_batch(defense, target, attacks, images[start:stop], labels[start:stop],
                                        indices[start:stop], spec.seed, modes, progress, evaluation_seed(spec))
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
    eval_seed: int | None = None,
    stored: list[bytes] | None = None,
) -> tuple[dict[str, list[dict]], dict, list[bytes], dict[int, bytes]]:
    """Attack one batch once (unless its ``stored`` examples are given), then judge the same
    adversarial examples under each evaluation mode.

    Per mode, per image: clean and adversarial predictions of ``defense``; ``target`` is what
    the attacks differentiate (the defense itself, its surrogate, BPDA, ...). An image is robust
    when its clean prediction and its prediction on every attack's example are correct (per-image
    worst case over the attacks; for expected:K per purification, see _records). Noise comes from
    per-image streams seeded from (seed, image index, purpose): the attack's passes and the
    evaluation use different purposes, so the attacker never sees the evaluation noise, and the
    clean and every adversarial evaluation share theirs (common random numbers: at eps = 0 the
    adversarial predictions equal the clean ones exactly). ``eval_seed`` (default ``seed``) seeds
    the evaluation streams. The modes share their purifications ("single" is the first pass of
    "worst:N"). Returns the records per mode, the cost (seconds attacking, "attack_s", and per
    attack by attack index, "attack_s_by_attack", 0 for stored examples; "eval_s" per mode: the
    seconds of its own passes), the examples in their
    stored form (stored_examples.py), which are what was judged, and the stored histories of the
    attacks that record one (attack index -> stored_histories blob; none for stored examples).
    """
    started = time.perf_counter()
    if stored is None:
        blobs, histories, seconds = attack_batch(defense, target, attacks, x, y, indices, seed, progress)
    else:
        blobs, histories, seconds = stored, {}, [0.0] * len(attacks)
    attack_s = time.perf_counter() - started
    records, eval_s = judge_batch(defense, attacks, x, y, indices, blobs, seed if eval_seed is None else eval_seed, modes)
    return records, {"attack_s": attack_s, "attack_s_by_attack": seconds, "eval_s": eval_s}, blobs, histories


def attack_batch(
    defense: Defense, target: torch.nn.Module, attacks: list[Attack], x: torch.Tensor, y: torch.Tensor,
    indices: torch.Tensor, seed: int, progress: bool = False,
) -> tuple[list[bytes], dict[int, bytes], list[float]]:
    """Each attack's adversarial examples of the [0,1] images ``x``, in their stored form, the
    stored histories of those attacks that record one (by attack index) and each attack's
    seconds (its examples copied to the CPU inside them, so queued GPU work is counted)."""
    attack_seeds = image_seeds(seed, indices, "attack")
    blobs, histories, seconds = [], {}, []
    for j, attack in enumerate(attacks):
        started = time.perf_counter()
        for module in {defense, target}:
            module.reseed(attack_seeds)
        x_adv, history = attack.perturb_with_history(target, x, y, progress=progress)
        if (perturbation_size(x_adv - x, attack.norm) > attack.eps * (1 + 1e-5) + 1e-7).any() or x_adv.min() < 0 or x_adv.max() > 1:
            raise RuntimeError(f"{attack.name} left the {attack.norm} eps-ball or the [0,1] box")  # a bug, never a result
        blobs.append(encode(x_adv, x))
        if history is not None:
            histories[j] = encode_history(history)
        seconds.append(time.perf_counter() - started)
    return blobs, histories, seconds


def judge_batch(
    defense: Defense, attacks: list[Attack], x: torch.Tensor, y: torch.Tensor, indices: torch.Tensor,
    blobs: list[bytes], eval_seed: int, modes: list[str],
) -> tuple[dict[str, list[dict]], dict[str, float]]:
    """Records per mode of the clean [0,1] images ``x`` and the stored adversarial examples
    ``blobs`` (one per attack), and each mode's seconds of purification."""
    if len(blobs) != len(attacks):
        raise ValueError(f"{len(blobs)} stored examples for {len(attacks)} attacks")
    examples = [decode(blob, x, attack.norm, attack.eps) for blob, attack in zip(blobs, attacks)]
    evaluate_seeds = image_seeds(eval_seed, indices, "evaluate")
    eval_s = dict.fromkeys(modes, 0.0)
    passes = {mode: parse_evaluation_mode(mode)[1] for mode in modes}
    per_input = []
    for inputs in [x, *examples]:
        defense.reseed(evaluate_seeds)  # so pass k is the same in every mode: the modes share passes
        predictions, seconds = purification_passes(defense, inputs, max(passes.values()))
        per_input.append(predictions)
        for mode in modes:  # each mode is charged its own passes
            eval_s[mode] += sum(seconds[:passes[mode]])
    records = {}
    for mode in modes:
        clean, *adversarial = [judged_labels(mode, predictions, y) for predictions in per_input]
        records[mode] = _records(mode, clean, adversarial, y, indices)
    return records, eval_s


def _records(mode: str, clean: torch.Tensor, adversarial: list[torch.Tensor], y: torch.Tensor, indices: torch.Tensor) -> list[dict]:
    """Per-image records from the judged labels (P, B) of the clean images and of each attack's
    examples (P = 1 except for expected:K, evaluation.judged_labels). In judged pass k an image is
    robust when its clean label and every attack's label are right (pass k of every input uses
    the same evaluation noise), robust to attack j when its clean label and attack j's are; the
    *_correct values are the outcomes over the passes (evaluation.outcomes). The labels shown are
    the first pass's: adv_pred is the first attack's wrong label in it (else the last attack's)."""
    clean, adversarial, y = clean.cpu(), [a.cpu() for a in adversarial], y.cpu()
    clean_ok = clean == y
    survived = [a == y for a in adversarial]
    robust = clean_ok.clone()
    for ok in survived:
        robust &= ok
    columns = {"clean_correct": outcomes(mode, clean_ok), "robust_correct": outcomes(mode, robust)}
    if len(adversarial) > 1:
        columns.update({f"robust_correct_{k}": outcomes(mode, clean_ok & ok) for k, ok in enumerate(survived)})
    first = [a[0] for a in adversarial]
    records = []
    for i in range(len(y)):
        broken = [pred[i] for pred in first if pred[i] != y[i]]
        records.append({
            "index": int(indices[i]), "label": int(y[i]),
            "clean_pred": int(clean[0, i]), "adv_pred": int(broken[0] if broken else first[-1][i]),
            **{name: values[i] for name, values in columns.items()},
        })
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
# streams; 3: defenses faithful to their reference code (M9), examples judged as stored (M10)),
# so a store never mixes results of different code.
RESULTS_VERSION = 3


@dataclass
class Loaded:
    """What a row runs on, loaded once per invocation and shared between its rows."""

    data: Any
    classifier: torch.nn.Module
    diffusion: torch.nn.Module | None


def load(spec: RunSpec, device: torch.device, cache: dict, progress: bool = False) -> Loaded:
    """The row's data and networks, each loaded once per ``cache``; ``progress`` shows a bar
    naming what is being loaded (reading 10,000 images and checkpoints takes seconds)."""
    data_seed = spec.seed if spec.data_seed is None else spec.data_seed
    steps = [
        (("data", spec.data, spec.n_images, data_seed), f"data {spec.data or 'official'}",
         lambda: load_cifar10(spec.data, split="test").subset(spec.n_images, data_seed)),
        (("classifier", spec.classifier, device), f"classifier {spec.classifier}",
         lambda: load_classifier(spec.classifier).to(device)),
    ]
    if DEFENSES.build(spec.defense).needs_diffusion:
        steps.append((("diffusion", spec.diffusion_model, device), f"diffusion model {spec.diffusion_model}",
                      lambda: load_diffusion_model(spec.diffusion_model).to(device)))
    missing = [step for step in steps if step[0] not in cache]
    # leave=False: the bar clears when done, so that a failed load leaves one error line only.
    with tqdm(missing, desc=f"{spec.defense}: loading", unit="part", disable=not (progress and missing), leave=False) as bar:
        for key, name, loader in bar:
            bar.set_postfix_str(name)
            cache[key] = loader()
    data, classifier = cache[steps[0][0]], cache[steps[1][0]]
    return Loaded(data, classifier, cache[steps[2][0]] if len(steps) == 3 else None)


def setup_record(
    spec: RunSpec, loaded: Loaded, defense: Defense, attacks: list[Attack], device: torch.device, skipped: list[Attack] = (),
) -> dict:
    """Every setting that can change a result: the store's key (its sha256) and the row's labels
    (``skipped``: the suite members that do not apply to the defense, named in the attack label)."""
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
        "attack": attack_label(attacks, mask_temperature(spec.attack), suite_name(spec.attack), skipped),
        "attack_settings": spec.attack,
        "gradient_mode": spec.gradient,
        "evaluation_modes": evaluation_modes(spec),
        "n_images": len(loaded.data),
        "seed": spec.seed,
        **({"eval_seed": spec.eval_seed} if spec.eval_seed not in (None, spec.seed) else {}),
        "batch_size": spec.batch_size,  # AutoAttack's results depend on the batch (noise.py)
        "sanity": dataclasses.asdict(sanity_config(spec)),
        "device_type": device.type,  # CPU and GPU kernels round differently
        "preset": spec.preset,
    }


# Setup fields that change how adversarial examples are judged, not the examples themselves.
EVALUATION_FIELDS = ("evaluation_modes", "eval_seed", "sanity")


def attack_key(setup: dict) -> str:
    """The key of a setup's adversarial examples in the store: the hash of its setup without the
    evaluation fields, shared by every evaluation of the same attack on the same images."""
    return setup_hash({k: v for k, v in setup.items() if k not in EVALUATION_FIELDS})


def run(
    spec: RunSpec,
    store: ResultStore | None,
    progress: bool = True,
    cache: dict | None = None,
    ranks: Ranks = Ranks(),
    device: torch.device = torch.device("cpu"),
    shard: ResultStore | None = None,
    phases: PhaseTimes | None = None,
) -> list[dict]:
    """Run one benchmark setup through the result store; returns its rows (one per evaluation
    mode) on rank 0 and [] on other ranks.

    ``store`` is the main result store, opened by rank 0 only (None on other ranks); in a
    distributed run every rank commits to its own ``shard`` store (distributed.py), whose copy
    of this setup is dropped once rank 0 has merged it.

    Batches already in the store (or in this rank's shard file) are skipped, so rerunning after
    a crash computes only what is missing. A batch whose adversarial examples are stored under
    this setup's attack key (by a run of the same attack with other evaluation settings: modes,
    eval seed, sanity checks) is judged from them without attacking; its cost copies the attack's
    seconds, in all and per attack, from the batch that attacked ("attack_reused_from": that setup). ``cache`` (a dict
    kept by the caller) shares loaded data and networks between the rows of one invocation;
    ``phases`` (also the caller's) adds up the seconds of each phase.
    """
    validate(spec)
    phases = PhaseTimes() if phases is None else phases
    loaded = load(spec, device, {} if cache is None else cache)  # the CLI has loaded it (with progress)
    defense = build_defense(spec.defense, loaded.classifier, loaded.diffusion, spec.defense_overrides, spec.seed, spec.threat)
    target = attack_model(defense, spec.gradient, mask_temperature(spec.attack))
    attacks, skipped = row_attacks(spec, defense)
    setup = setup_record(spec, loaded, defense, attacks, device, skipped)
    key, examples_key = setup_hash(setup), attack_key(setup)

    shard = shard if ranks.distributed else store
    for s in {store, shard} - {None}:
        s.register(key, setup)
    pending = _pending_batches(spec, len(loaded.data), key, store, shard, ranks)
    reusable = _reusable_examples(examples_key, pending, len(attacks), store, shard, ranks)
    if reusable and ranks.is_main:
        sources = ", ".join(sorted({e.source[:12] for e in reusable.values()}))
        print(f"{spec.defense}: judging {len(reusable)} of {len(pending)} batches from stored adversarial "
              f"examples (attacked by setup {sources}), no attack")
    label = f"{spec.defense}" + (f" [rank {ranks.rank}/{ranks.world_size}]" if ranks.distributed else "")
    with phases.phase("attack + evaluate"):
        _attack_batches(pending[ranks.rank::ranks.world_size], reusable, label, spec, setup, key, examples_key,
                        loaded, defense, target, attacks, shard, ranks, device, progress)
    if ranks.distributed:
        _merge_shards(key, store, shard, ranks)
        barrier(ranks)  # rank 0 has committed every batch: the shards' copies can go
        shard.forget(key)
        if not ranks.is_main:
            return []
    return finish_rows(key, setup, store, loaded, defense, target, attacks, spec, device, phases, progress)


def _attack_batches(starts, reusable, label, spec, setup, key, examples_key, loaded, defense, target, attacks,
                    shard, ranks, device, progress) -> None:
    """Attack and judge the batches at ``starts`` (or judge their ``reusable`` stored examples),
    committing each to ``shard`` as soon as it is done."""
    images, labels, indices = loaded.data.as_float(), loaded.data.labels, loaded.data.index
    for start in tqdm(starts, desc=f"{label}: attack + evaluate", unit="batch", disable=not progress):
        stop, reused = start + spec.batch_size, reusable.get(start)
        with PeakMemory(device) as peak:
            records, cost, blobs, histories = evaluate_batch(
                defense, target, attacks, images[start:stop].to(device), labels[start:stop].to(device),
                indices[start:stop], spec.seed, setup["evaluation_modes"], progress, evaluation_seed(spec),
                None if reused is None else reused.blobs,
            )
        if reused is not None:  # the attacking batch's seconds (per attack: none stored before they were)
            cost.update(attack_s=reused.attack_s, attack_s_by_attack=reused.attack_s_by_attack, attack_reused_from=reused.source)
        cost.update(peak_mib=peak.mib, device=device_name(device), rank=ranks.rank)
        shard.commit_batch(key, start, records, cost, examples_key, blobs if reused is None else [], histories)


def _pending_batches(spec: RunSpec, n: int, key: str, store: ResultStore | None, shard: ResultStore, ranks: Ranks) -> list[int]:
    """The starts of the batches in no store yet (each rank computes every world_size-th)."""
    done = shard.done_batches(key) | (store.done_batches(key) if store is not None else set())
    done = set().union(*all_gather(ranks, done))
    starts = range(0, n, spec.batch_size)
    pending = [s for s in starts if s not in done]
    if done and ranks.is_main:
        print(f"{spec.defense}: {len(starts) - len(pending)} of {len(starts)} batches already in the store"
              + (", computing the rest" if pending else ""))
    return pending


def _reusable_examples(
    examples_key: str, pending: list[int], n_attacks: int, store: ResultStore | None, shard: ResultStore, ranks: Ranks,
) -> dict[int, StoredExamples]:
    """Stored adversarial examples of pending batches under this attack key; in a distributed
    run gathered from every rank's stores (rank 0 reads the main store), so any rank can judge
    any batch."""
    found: dict[int, StoredExamples] = {}
    for s in {store, shard} - {None}:
        found.update((start, e) for start, e in s.stored_examples(examples_key).items()
                     if start in pending and len(e.blobs) == n_attacks)
    return {start: e for part in all_gather(ranks, found) for start, e in part.items()}


def _merge_shards(key: str, store: ResultStore | None, shard: ResultStore, ranks: Ranks) -> None:
    """Rank 0 commits every rank's batches of this setup into the main store."""
    gathered = gather_to_main(ranks, shard.batches(key))
    if gathered is None:
        return
    have = store.done_batches(key)
    for batches in gathered:
        for batch in batches:
            if batch[0] not in have:
                store.commit_batch(key, *batch)
                have.add(batch[0])


def finish_rows(key, setup, store, loaded, defense, target, attacks, spec, device,
                phases: PhaseTimes | None = None, progress: bool = False) -> list[dict]:
    """Sanity checks (once per setup, kept in the store) and the rows, built from the store."""
    modes = setup["evaluation_modes"]
    frames = {mode: store.per_image(key, mode) for mode in modes}
    if len(frames[modes[0]]) != len(loaded.data):
        raise RuntimeError(f"store {store.path} holds {len(frames[modes[0]])} of {len(loaded.data)} results")
    stored = store.sanity(key)
    if stored is None:
        started = time.perf_counter()
        with (PhaseTimes() if phases is None else phases).phase("sanity checks"):
            checks = sanity_checks(defense, target, attacks, loaded.classifier, loaded.data.as_float().to(device),
                                   loaded.data.labels.to(device), loaded.data.index, spec, frames, progress)
        stored = {m: [dataclasses.asdict(c) for c in cs] for m, cs in checks.items()}, time.perf_counter() - started
        store.save_sanity(key, *stored)
    checks, sanity_wall = stored
    costs = store.batch_costs(key)
    # The histories of the attack that made the examples (this setup's, or the one whose stored
    # examples it judged), batch by batch.
    stored_histories = store.histories(attack_key(setup))
    histories = [stored_histories.get(start, {}) for start in sorted(store.done_batches(key))]
    rows = {mode: make_row(setup, mode, frames[mode], costs, checks[mode], sanity_wall, defense.nfe, attacks, histories)
            for mode in modes}
    store.save_rows(key, rows)
    return [{**row, "setup_hash": key} for row in rows.values()]


def make_row(setup: dict, mode: str, per_image: pd.DataFrame, costs: list[dict], checks: list[dict],
             sanity_wall: float, nfe: int, attacks: list[Attack], histories: list[dict[int, bytes]] = ()) -> dict:
    """One leaderboard row: the setup's labels, the accuracies, the attacks' convergence
    evidence and DiffHammer's own N-evaluation (from ``histories``: per batch, attack index ->
    stored history) and what the row cost."""
    # What this row would cost alone: the (shared) attack plus its own evaluation, summed over
    # batches (device-seconds: in a sharded run, the sum over the ranks).
    wall = sum(c["attack_s"] + c["eval_s"][mode] for c in costs)
    return {
        **{k: setup[k] for k in ("defense", "defense_config", "classifier", "diffusion_model", "data_source",
                                 "threat", "eps", "attack", "gradient_mode", "n_images", "seed", "preset")},
        "eval_seed": setup.get("eval_seed", setup["seed"]),
        "attack_reused": any("attack_reused_from" in c for c in costs),
        "evaluation": mode,
        **accuracy_fields(per_image),
        "robust_by_attack": robust_by_attack(per_image, attacks),
        **n_evaluation_fields(histories, attacks),
        "nfe": nfe,
        "wall_s": round(wall, 2),
        "attack_s_by_attack": attack_seconds(costs, attacks),
        "images_per_s": round(len(per_image) / wall, 4) if wall > 0 else float("nan"),
        "peak_mem_mib": round(max(c["peak_mib"] for c in costs)),
        "device": " + ".join(sorted({c["device"] for c in costs})),
        "sanity": summarise(checks) if checks else "not run",
        "sanity_checks": checks,
        "sanity_wall_s": round(sanity_wall, 1),
        **convergence_fields(histories, attacks, len(per_image)),
    }


def convergence_fields(histories: list[dict[int, bytes]], attacks: list[Attack], n_images: int) -> dict:
    """``convergence``: per attack with a history in every batch, its name, its robust counts per
    record summed over the batches (the attack's own noisy check; robust accuracy = count /
    n_images) and whether they converged (attacks/convergence.converged); ``converged``: "yes"
    when every such attack did, "no" when one did not, "n/a" when none has a history (attacks
    that record none, rows stored before histories were)."""
    entries = []
    for j, attack in enumerate(attacks):
        blobs = [batch.get(j) for batch in histories]
        if not blobs or None in blobs:
            continue
        counts = combined_counts([robust_counts(blob) for blob in blobs])
        entries.append({"attack": attack.name, "robust_counts": counts, "converged": converged(counts, n_images)})
    verdict = "n/a" if not entries else "yes" if all(e["converged"] for e in entries) else "no"
    return {"converged": verdict, "convergence": entries}


def attack_seconds(costs: list[dict], attacks: list[Attack]) -> str:
    """Each attack's seconds summed over the batches ("PGD-EOT(...) 12.3 s; ..."; they add up to
    about the batches' attack_s): what each member of a suite cost; "-" when a batch was stored
    without them (before attacks were timed one by one)."""
    per_batch = [c.get("attack_s_by_attack") for c in costs]
    if not per_batch or any(seconds is None or len(seconds) != len(attacks) for seconds in per_batch):
        return "-"
    return "; ".join(f"{a.name} {sum(seconds[j] for seconds in per_batch):.1f} s" for j, a in enumerate(attacks))


def convergence_warning(row: dict) -> str | None:
    """What `run` warns about a row that did not converge (None when it did or cannot say)."""
    if row.get("converged") != "no":
        return None
    late = [f"{e['attack']}'s robust count moved by {tail_change(e['robust_counts'])} images over the last 25% of "
            f"its {len(e['robust_counts'])} passes" for e in row["convergence"] if not e["converged"]]
    return f"not converged ({'; '.join(late)}; at most 1 expected): more iterations may lower robust accuracy"


def accuracy_fields(per_image: pd.DataFrame) -> dict:
    """clean_acc and robust_acc (means of the per-image outcomes) with their 95% intervals over
    the images as [low, high] fractions, and how the robust interval was made."""
    clean, robust = accuracy_interval(per_image["clean_correct"]), accuracy_interval(per_image["robust_correct"])
    return {
        "clean_acc": clean.value, "robust_acc": robust.value,
        "clean_ci": [clean.low, clean.high], "robust_ci": [robust.low, robust.high],
        "interval_method": robust.method,
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
    """Each attack's own robust accuracy (%) with its 95% interval when a row has several ("-"
    otherwise); the row's robust_acc is the per-image worst case, never above the minimum of these."""
    if len(attacks) < 2:
        return "-"
    return "; ".join(f"{a.name} {accuracy_interval(per_image[f'robust_correct_{k}']).as_percent()}" for k, a in enumerate(attacks))


def sanity_checks(
    defense, target, attacks, classifier, images, labels, indices, spec: RunSpec, frames: dict[str, pd.DataFrame],
    progress: bool = False,
) -> dict[str, list]:
    """Per evaluation mode, the sanity checks on the first ``sanity.images`` images of the row
    (sanity.py); the row's own results (``frames``) are the full-budget reference. ``progress``
    shows a bar naming the running check (the first mode's: later modes judge the same examples)."""
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
    with tqdm(total=len(check_names(attacks)), desc=f"{spec.defense}: sanity checks", unit="check",
              disable=not progress) as bar:
        begun = []

        def started(name: str) -> None:
            bar.update(1 if begun else 0)  # the previous check has finished
            begun.append(name)
            bar.set_postfix_str(f"{name} ({n} images)")

        for i, mode in enumerate(modes):
            full = frames[mode].iloc[:n].reset_index(drop=True)
            evaluate = lambda attacks_, d=None, t=None, mode=mode: evaluate_all(attacks_, d, t)[mode]  # noqa: E731
            checks[mode] = run_sanity_checks(evaluate, full, attacks, target, classifier, x, y, spec.threat, config,
                                             started if i == 0 else None)
        if begun:
            bar.update(1)
    return checks
