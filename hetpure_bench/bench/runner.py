"""The run orchestration: one defense, one attack, some evaluation modes, on a seeded image subset.

Every batch's results are committed to the result store (store.py) before the next batch starts;
rows and leaderboards are built from the store. Noise discipline: see batches.evaluate_batch.
"""

from __future__ import annotations

import dataclasses
import hashlib
import time
from dataclasses import dataclass
from typing import Any

import pandas as pd
import torch
from tqdm.auto import tqdm

from ..attacks import mask_temperature
from ..attacks.base import Attack
from ..attacks.gradients import attack_model
from ..data import load_cifar10
from ..defenses import DEFENSES, build_defense
from ..defenses.base import Defense
from ..models.classifiers import load_classifier
from ..models.diffusion_zoo import load_diffusion_model
from .batches import evaluate_batch, evaluate_modes
from .distributed import Ranks, all_gather, barrier, gather_to_main
from .peak_memory import PeakMemory
from .phase_times import PhaseTimes
from .rows import make_row
from .sanity import check_names, run_sanity_checks
from .spec import RunSpec, evaluation_modes, evaluation_seed, row_attacks, sanity_config, spec_attack_label, validate
from .store import ResultStore, StoredExamples, setup_hash

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
        "attack": spec_attack_label(spec, attacks, skipped),
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
