import dataclasses
import time
from dataclasses import dataclass

import pandas as pd
import pytest
import torch
from tiny_models import tiny_models

from hetpure_bench.attacks.base import Attack
from hetpure_bench.attacks.gradients import attack_model, parse_gradient_mode
from hetpure_bench.attacks.pgd_eot import PGDEOT
from hetpure_bench.bench.batches import attack_and_evaluate, evaluate_modes
from hetpure_bench.bench.evaluation import majority_vote, parse_evaluation_mode, predict
from hetpure_bench.bench.spec import RunSpec, parse_eps, spec_from_preset, validate
from hetpure_bench.bench.statistics import wilson_interval
from hetpure_bench.bench.store import ResultStore
from hetpure_bench.defenses import build_defense
from hetpure_bench.errors import UserError


def _data(n=6):
    g = torch.Generator().manual_seed(0)
    return torch.rand(n, 3, 8, 8, generator=g), torch.arange(n) % 10, torch.arange(n)


@pytest.mark.parametrize("evaluation", ["single", "vote:3"])
def test_eps_zero_gives_robust_equal_to_clean(evaluation):
    classifier, diffusion = tiny_models()
    defense = build_defense("hetpure", classifier, diffusion, {"t_l": 40, "t_s": 20, "stride": 20})
    spec = RunSpec(defense="hetpure", eps=0.0, evaluation=evaluation, batch_size=4)
    attack = PGDEOT(eps=0.0, steps=2, eot=2)
    x, y, index = _data()
    per_image = attack_and_evaluate(defense, defense, [attack], x, y, index, spec, progress=False)
    assert per_image["robust_correct"].tolist() == per_image["clean_correct"].tolist()
    assert (per_image["adv_pred"] == per_image["clean_pred"]).all()


def test_per_image_results_do_not_depend_on_the_batch_size():
    classifier, diffusion = tiny_models()
    defense = build_defense("hetpure", classifier, diffusion, {"t_l": 40, "t_s": 20, "stride": 20})
    x, y, index = _data()
    attack = PGDEOT(eps=0.05, step_size=0.02, steps=2, eot=2)
    frames = [
        evaluate_modes(defense, defense, [attack], x, y, index * 7, RunSpec(defense="hetpure", batch_size=b),
                       ["single", "worst:3"], progress=False)
        for b in (6, 4, 1)
    ]
    for other in frames[1:]:
        for mode in ("single", "worst:3"):
            pd.testing.assert_frame_equal(frames[0][mode], other[mode])


def test_modes_evaluated_together_share_passes_and_equal_each_mode_alone():
    classifier, diffusion = tiny_models()
    defense = build_defense("hetpure", classifier, diffusion, {"t_l": 40, "t_s": 20, "stride": 20})
    x, y, index = _data()
    attack = PGDEOT(eps=0.05, step_size=0.02, steps=1, eot=1)
    calls = []
    defense.register_forward_pre_hook(lambda module, args: calls.append(1))
    run = lambda modes: evaluate_modes(defense, defense, [attack], x, y, index, RunSpec(defense="hetpure", batch_size=6),  # noqa: E731
                                       modes, progress=False)
    modes = ["single", "vote:3", "worst:3", "expected:3"]
    together = run(modes)
    assert len(calls) == 2 + 2 * 3  # the attack's step and its check of the example, then 3 passes each for clean and adversarial
    for mode in modes:
        pd.testing.assert_frame_equal(together[mode], run([mode])[mode])
    # All 3 passes right <=> worst-of-3 right.
    assert ((together["expected:3"]["robust_correct"] == 1) == together["worst:3"]["robust_correct"]).all()


def test_attack_lowers_accuracy_of_the_bare_classifier():
    classifier, _ = tiny_models()
    defense = build_defense("none", classifier, None)
    x, _, index = _data(8)
    with torch.no_grad():
        y = classifier(x).argmax(1)  # labels the classifier gets right
    spec = RunSpec(defense="none", eps=0.5, batch_size=8)
    per_image = attack_and_evaluate(defense, defense, [PGDEOT(eps=0.5, step_size=0.1, steps=20, eot=1)], x, y, index, spec, progress=False)
    assert per_image["clean_correct"].all()
    assert per_image["robust_correct"].mean() < 0.5


def test_evaluation_modes():
    assert parse_evaluation_mode("single") == ("single", 1) and parse_evaluation_mode("vote:20") == ("vote", 20)
    assert parse_evaluation_mode("worst:5") == ("worst", 5)
    with pytest.raises(UserError):
        parse_evaluation_mode("worst")
    votes = torch.tensor([[1, 2, 3], [1, 3, 4], [2, 3, 4]])
    assert majority_vote(votes, 10).tolist() == [1, 3, 4]
    assert majority_vote(torch.tensor([[5], [2]]), 10).tolist() == [2]  # tie -> lowest label

    class Alternating(torch.nn.Module):
        calls = 0

        def forward(self, x):
            self.calls += 1
            logits = torch.zeros(x.shape[0], 10)
            logits[:, 7 if self.calls % 3 else 1] = 1  # 7, 7, 1 over three calls
            return logits

    model = Alternating()
    assert predict(model, torch.zeros(2, 3, 8, 8), torch.tensor([7, 1]), "vote:3").tolist() == [7, 7]
    assert model.calls == 3


def test_gradient_modes():
    classifier, diffusion = tiny_models()
    defense = build_defense("hetpure", classifier, diffusion)
    assert attack_model(defense, "full") is defense
    assert attack_model(defense, "surrogate:2").nfe == 2
    assert parse_gradient_mode("surrogate:4") == ("surrogate", 4)
    for bad in ("surrogate", "surrogate:0", "bpda:1", "ful"):
        with pytest.raises(UserError):
            parse_gradient_mode(bad)


def test_parse_eps_and_validation():
    assert parse_eps("8/255") == pytest.approx(8 / 255) and parse_eps(0.5) == 0.5
    with pytest.raises(UserError):
        parse_eps("eight")
    validate(spec_from_preset("smoke", "hetpure"))
    with pytest.raises(UserError, match="out of range for Linf"):
        validate(spec_from_preset("smoke", "hetpure", eps="300/255"))
    with pytest.raises(UserError, match="did you mean 'diffpure'"):
        validate(spec_from_preset("smoke", "difpure"))
    with pytest.raises(UserError, match="unknown preset"):
        spec_from_preset("paper-nothing", "hetpure")


def test_preset_defense_settings_and_cli_overrides():
    spec = spec_from_preset("smoke", "hetpure", n_images=4, attack={"steps": 3}, defense_overrides={"t_l": 100})
    assert spec.n_images == 4 and spec.attack["steps"] == 3 and spec.attack["eot"] == 2
    assert spec.defense_overrides == {"stride": 20, "t_l": 100}
    assert spec.eps == pytest.approx(8 / 255)
    other = spec_from_preset("smoke", "hetpure", attack={"name": "autoattack", "steps": 3})
    assert other.attack == {"name": "autoattack", "version": "rand", "steps": 3, "eot": 2}  # the preset's autoattack settings


def test_bad_attack_settings_are_refused_before_running():
    with pytest.raises(UserError, match="unknown attack 'autoatack'; did you mean 'autoattack'"):
        validate(spec_from_preset("smoke", "hetpure", attack={"name": "autoatack"}))
    with pytest.raises(UserError, match="bad setting for attack 'autoattack'"):
        validate(spec_from_preset("smoke", "hetpure", attack={"name": "autoattack", "step_size": 0.1}))
    with pytest.raises(UserError, match="unknown AutoAttack version"):
        validate(spec_from_preset("smoke", "hetpure", attack={"name": "autoattack", "version": "fast"}))
    with pytest.raises(UserError, match="did you mean 'EOTPGD'"):
        validate(spec_from_preset("smoke", "hetpure", attack={"name": "torchattacks", "attack": "EOTPDG"}))
    with pytest.raises(UserError, match="no attention mask"):
        validate(spec_from_preset("smoke", "diffpure", attack={"mask_aware": 0.05}))
    with pytest.raises(UserError, match="needs gradients through the purifier"):
        validate(spec_from_preset("smoke", "hetpure", attack={"mask_aware": 0.05}, gradient="bpda"))
    with pytest.raises(UserError, match="mask_aware must be a temperature"):
        validate(spec_from_preset("smoke", "hetpure", attack={"mask_aware": -1}))
    with pytest.raises(UserError, match="bad sanity setting"):
        validate(spec_from_preset("smoke", "hetpure", sanity={"slices": 3}))


def test_several_attacks_count_an_image_robust_only_if_it_survives_all():
    from linear_models import linear_problem, linf_breakable

    from hetpure_bench.bench.rows import robust_by_attack

    model, x, y = linear_problem(n=16)
    defense = build_defense("none", model, None)
    weak, strong = PGDEOT(eps=0.01, step_size=0.005, steps=4, eot=1), PGDEOT(eps=0.03, step_size=0.01, steps=6, eot=1)
    spec = RunSpec(defense="none", eps=0.03, batch_size=16)
    per_image = attack_and_evaluate(defense, defense, [weak, strong], x, y, torch.arange(16), spec, progress=False)
    assert per_image["robust_correct_0"].tolist() == (~linf_breakable(model, x, y, 0.01)).tolist()
    assert per_image["robust_correct_1"].tolist() == (~linf_breakable(model, x, y, 0.03)).tolist()
    both = per_image["robust_correct_0"] & per_image["robust_correct_1"]
    assert per_image["robust_correct"].tolist() == both.tolist()
    label = robust_by_attack(per_image, [weak, strong])
    survived = int(per_image["robust_correct_1"].sum())
    low, high = wilson_interval(survived, 16)
    assert label.count("PGD-EOT") == 2 and f"{100 * survived / 16:.1f} [{100 * low:.1f}, {100 * high:.1f}]" in label


def test_the_smoke_preset_keeps_every_registered_defense_at_smoke_scale():
    from torch import nn

    from hetpure_bench.defenses import DEFENSES

    for name in DEFENSES.names():
        spec = spec_from_preset("smoke", name)
        defense = build_defense(name, nn.Identity(), nn.Identity(), spec.defense_overrides, threat=spec.threat)
        assert defense.nfe <= 20, f"{name}: {defense.nfe} network calls in the smoke preset"


def test_paper_presets_come_in_two_protocol_families():
    """`paper-*-reference` is the authors' evaluation; `paper-*` the strongest the project offers."""
    from hetpure_bench.bench.spec import preset_sibling

    for stem in ("paper-wrn28-linf", "paper-wrn28-l2", "paper-wrn70-linf"):
        assert preset_sibling(stem) == f"{stem}-reference" and preset_sibling(f"{stem}-reference") == stem
        reference, strongest = spec_from_preset(f"{stem}-reference", "hetpure"), spec_from_preset(stem, "hetpure")
        assert (reference.gradient, reference.evaluation, reference.seed, reference.data_seed) == ("surrogate:2", "vote:20", 2024, 0)
        assert reference.attack == {"name": "autoattack", "version": "rand", "eot": 20}
        assert reference.defense_overrides["mask.reference_input"] is True
        assert (strongest.gradient, strongest.seed, strongest.data_seed) == ("full", 0, 0)
        assert "mask.reference_input" not in strongest.defense_overrides
        assert (reference.classifier, reference.diffusion_model, reference.n_images) == (
            strongest.classifier, strongest.diffusion_model, strongest.n_images)
    assert spec_from_preset("paper-wrn28-l2-reference", "hetpure").eps == pytest.approx(8 / 255)  # the authors' L2 run
    assert spec_from_preset("paper-wrn28-l2", "hetpure").eps == 0.5
    assert preset_sibling("smoke") is None


def test_the_image_subset_has_its_own_seed(tmp_path):
    """data_seed picks the images, seed the noise: the reference draws images with RandomState(0)
    and seeds its noise with 2024."""
    from conftest import write_image_tar

    from hetpure_bench.bench.runner import load

    data = write_image_tar(tmp_path / "test.tar", 30, "test")
    base = RunSpec(defense="none", data=str(data), n_images=4, seed=2024, data_seed=0)
    by_data_seed = load(base, torch.device("cpu"), {}).data.index
    by_seed_0 = load(dataclasses.replace(base, seed=0, data_seed=None), torch.device("cpu"), {}).data.index
    assert torch.equal(by_data_seed, by_seed_0)
    assert not torch.equal(by_data_seed, load(dataclasses.replace(base, data_seed=None), torch.device("cpu"), {}).data.index)
@dataclass
class _Images:
    """What runner.load's data provides: [0,1] images with labels and dataset indices."""

    images: torch.Tensor
    labels: torch.Tensor
    index: torch.Tensor
    source: str = "generated"

    def as_float(self):
        return self.images

    def __len__(self):
        return len(self.labels)


def _tiny_runs(monkeypatch):
    """runner.run on 6 generated 8x8 images with a tiny diffusion model and a linear classifier
    (whose predictions vary with DiffPure's noise); returns the list of attack calls."""
    from linear_models import LinearClassifier

    from hetpure_bench.bench import runner

    _, diffusion = tiny_models()
    g = torch.Generator().manual_seed(0)
    classifier = LinearClassifier(torch.randn(10, 192, generator=g), torch.zeros(10)).eval()
    x = torch.rand(6, 3, 8, 8, generator=g)
    data = _Images(x, classifier(x).argmax(1).detach(), torch.arange(6) * 3)
    monkeypatch.setattr(runner, "load", lambda spec, device, cache: runner.Loaded(data, classifier, diffusion))
    calls, perturb = [], PGDEOT.perturb_with_history
    monkeypatch.setattr(PGDEOT, "perturb_with_history", lambda self, *a, **k: calls.append(self) or perturb(self, *a, **k))
    return calls


def _spec(defense, **changes):
    overrides = {"t_star": 0.2, "sampler": "ddim", "ddim_stride": 100} if defense == "diffpure" else {}
    spec = RunSpec(defense=defense, n_images=6, batch_size=3, evaluation="single,expected:3", sanity={"images": 0},
                   attack={"name": "pgd-eot", "steps": 1, "eot": 1, "step_size": 0.01}, defense_overrides=overrides)
    return dataclasses.replace(spec, **changes)


def test_rerunning_with_other_evaluation_settings_judges_the_stored_examples_without_attacking(tmp_path, monkeypatch, capsys):
    from hetpure_bench.bench.runner import attack_key, run

    attacks = _tiny_runs(monkeypatch)
    with ResultStore(tmp_path / "r.sqlite") as store:
        first = run(_spec("diffpure"), store, progress=False)
        assert len(attacks) == 2  # one attack, two batches
        again = run(_spec("diffpure", evaluation="expected:3,worst:2"), store, progress=False)
        seeded = run(_spec("diffpure", eval_seed=7), store, progress=False)
        assert len(attacks) == 2  # neither attacked
        assert "judging 2 of 2 batches from stored adversarial examples" in capsys.readouterr().out
        key, again_key, seeded_key = first[0]["setup_hash"], again[0]["setup_hash"], seeded[0]["setup_hash"]
        assert len({key, again_key, seeded_key}) == 3
        assert len({attack_key(store.setup(k)) for k in (key, again_key, seeded_key)}) == 1
        # The default evaluation seed: the same records, bit for bit.
        pd.testing.assert_frame_equal(store.per_image(again_key, "expected:3"), store.per_image(key, "expected:3"))
        # Another evaluation seed: the same examples under other noise, so other predictions.
        original, rejudged = store.per_image(key, "expected:3"), store.per_image(seeded_key, "expected:3")
        assert (original["clean_pred"] != rejudged["clean_pred"]).any()
        assert (original["clean_correct"] != rejudged["clean_correct"]).any()
        # Only the first run stored examples; the others copy its attack's seconds.
        assert store.db.execute("SELECT COUNT(*), COUNT(DISTINCT setup_hash) FROM examples").fetchone() == (2, 1)
        costs, reused = store.batch_costs(key), store.batch_costs(seeded_key)
        assert [c["attack_reused_from"] for c in reused] == [key, key] and "attack_reused_from" not in costs[0]
        assert [c["attack_s"] for c in reused] == [c["attack_s"] for c in costs]
        assert [(r["eval_seed"], r["attack_reused"]) for r in first + seeded] == [(0, False)] * 2 + [(7, True)] * 2
        # An eval seed equal to the run's seed is the run itself: nothing to compute.
        assert [r["setup_hash"] for r in run(_spec("diffpure", eval_seed=0), store, progress=False)] == [key, key]
        assert len(attacks) == 2


def test_a_deterministic_defense_judges_stored_examples_under_any_seed_alike(tmp_path, monkeypatch):
    from hetpure_bench.bench.runner import run

    attacks = _tiny_runs(monkeypatch)
    with ResultStore(tmp_path / "r.sqlite") as store:
        first = run(_spec("none"), store, progress=False)
        seeded = run(_spec("none", eval_seed=3), store, progress=False)
        assert len(attacks) == 2
        for mode in ("single", "expected:3"):
            pd.testing.assert_frame_equal(store.per_image(first[0]["setup_hash"], mode), store.per_image(seeded[0]["setup_hash"], mode))
        assert first[0]["robust_acc"] < first[0]["clean_acc"] == 1  # the examples do something


def test_the_attack_key_ignores_exactly_the_evaluation_settings():
    from hetpure_bench.bench.runner import attack_key

    setup = {"eps": "0.0313725", "seed": 0, "evaluation_modes": ["single"], "sanity": {"images": 8}}
    same = {**setup, "evaluation_modes": ["worst:5"], "eval_seed": 3, "sanity": {"images": 0}}
    assert attack_key(same) == attack_key(setup)
    assert attack_key({**setup, "eps": "0.01"}) != attack_key(setup)
    assert attack_key({**setup, "seed": 1}) != attack_key(setup)


def test_a_bad_eval_seed_is_refused():
    for bad in (-1, "3", 1.5):
        with pytest.raises(UserError, match="eval seed must be an integer >= 0"):
            validate(spec_from_preset("smoke", "none", eval_seed=bad))


# ---------------------------------------------------------------- seconds per attack


@dataclass(frozen=True)
class Sleeping(Attack):
    """Leaves the images as they are after sleeping ``seconds``: an attack of known cost."""

    seconds: float = 0.0
    norm: str = "Linf"
    eps: float = 0.03
    steps: int = 1
    seed: int = 0

    @property
    def name(self) -> str:
        return f"Sleeping({self.seconds:g} s)"

    def perturb(self, model, x, y, progress=False):
        time.sleep(self.seconds)
        return x.clone()


def test_attack_seconds_sums_each_attack_over_the_batches_and_says_dash_without_them():
    from hetpure_bench.bench.rows import attack_seconds

    attacks = [Sleeping(0.1), Sleeping(0.2)]
    costs = [{"attack_s_by_attack": [1.0, 2.5]}, {"attack_s_by_attack": [0.5, 0.3]}]
    assert attack_seconds(costs, attacks) == "Sleeping(0.1 s) 1.5 s; Sleeping(0.2 s) 2.8 s"
    assert attack_seconds(costs + [{"attack_s": 1.0}], attacks) == "-"  # a batch stored before: unknown
    assert attack_seconds(costs + [{"attack_s_by_attack": None}], attacks) == "-"  # reused from such a batch


def test_each_attack_is_timed_alone_and_reused_examples_copy_its_seconds(tmp_path, monkeypatch):
    from hetpure_bench.attacks import ATTACKS
    from hetpure_bench.bench.runner import run
    from hetpure_bench.registry import Entry

    _tiny_runs(monkeypatch)
    short, long = Sleeping(0.02), Sleeping(0.1)
    monkeypatch.setitem(ATTACKS._entries, "sleeping", Entry("sleeping", lambda **settings: [short, long]))
    spec = _spec("none", attack={"name": "sleeping"}, evaluation="single")
    with ResultStore(tmp_path / "r.sqlite") as store:
        row = run(spec, store, progress=False)[0]
        costs = store.batch_costs(row["setup_hash"])
        assert len(costs) == 2  # two batches of three images
        for cost in costs:
            first, second = cost["attack_s_by_attack"]
            assert first >= 0.02 and second >= 0.1  # each attack's own sleep, at least
            assert first + second <= cost["attack_s"] <= first + second + 0.5  # together about the batch's
        totals = [sum(c["attack_s_by_attack"][j] for c in costs) for j in range(2)]
        assert row["attack_s_by_attack"] == f"Sleeping(0.02 s) {totals[0]:.1f} s; Sleeping(0.1 s) {totals[1]:.1f} s"
        # Judged again from the stored examples: the attacking batches' seconds, per attack too.
        again = run(dataclasses.replace(spec, evaluation="worst:2"), store, progress=False)[0]
        reused = store.batch_costs(again["setup_hash"])
        assert [c["attack_s_by_attack"] for c in reused] == [c["attack_s_by_attack"] for c in costs]
        assert again["attack_reused"] and again["attack_s_by_attack"] == row["attack_s_by_attack"]
        # Examples stored before attacks were timed one by one: the reusing row says "-".
        store.db.execute("UPDATE batches SET cost = json_remove(cost, '$.attack_s_by_attack') WHERE setup_hash = ?",
                         (row["setup_hash"],))
        old = run(dataclasses.replace(spec, evaluation="vote:3"), store, progress=False)[0]
        assert old["attack_reused"] and old["attack_s_by_attack"] == "-"
