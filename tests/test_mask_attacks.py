"""hetpure's adaptive attacks (attacks/mask_attacks.py): APGD-EOT through the relaxed attention
mask (fixed or annealed temperature), APGD-EOT projected off the mask, and their suite."""

import math

import pytest
import torch
from test_runner import _Images
from tiny_models import tiny_models
from torch import nn

from hetpure_bench.attacks import ATTACKS, HETPURE_ADAPTIVE, build_attacks
from hetpure_bench.attacks.apgd import APGDEOT
from hetpure_bench.attacks.gradients import BPDA
from hetpure_bench.attacks.mask_attacks import MaskAvoidingAPGD, MaskAwareAPGD, geometric_schedule
from hetpure_bench.attacks.threat import mask_avoiding_projection, perturbation_size
from hetpure_bench.bench.spec import spec_from_preset, validate
from hetpure_bench.bench.store import ResultStore
from hetpure_bench.defenses import build_defense
from hetpure_bench.defenses.attention_mask import attention_mask
from hetpure_bench.defenses.hetpure import HeterogeneousPurifier
from hetpure_bench.errors import UserError

TINY_HETPURE = {"t_l": 40, "t_s": 20, "stride": 20, "mask.tau": 0.5}  # 2 network calls, masks about half the pixels
SEEDS = [11, 12, 13]  # per-image attack streams, as the runner seeds them


def _hetpure(name="hetpure"):
    classifier, diffusion = tiny_models()
    return build_defense(name, classifier, diffusion, TINY_HETPURE)


def _images(n=3):
    return torch.rand(n, 3, 8, 8, generator=torch.Generator().manual_seed(1))


def _problem():
    defense, x = _hetpure(), _images()
    with torch.no_grad():
        y = defense.classifier(x).argmax(1)
    return defense, x, y


def _independent_mask(defense, x):
    """The attention mask computed straight from attention_mask.py, not through the defense's hook."""
    with torch.no_grad():
        return attention_mask(defense.classifier, x, defense.config.mask)


# ---------------------------------------------------------------- the projection


@pytest.mark.parametrize("norm, eps, expected_delta", [
    # Linf: the masked pixel's 0.4 goes, the others are clamped to 0.1 and the pixel at 0.95 to the box.
    ("Linf", 0.1, [[[0.0, 0.1], [-0.05, 0.05]], [[0.0, 0.0], [0.1, -0.1]]]),
    # L2: off the mask the perturbation (0.3, 0.4: norm 0.5) is scaled to eps 0.25.
    ("L2", 0.25, [[[0.0, 0.15], [0.0, 0.0]], [[0.0, 0.0], [0.2, 0.0]]]),
])
def test_the_projection_zeroes_the_masked_pixels_then_keeps_the_ball_and_the_box(norm, eps, expected_delta):
    x = torch.full((1, 2, 2, 2), 0.5, dtype=torch.float64)
    x[0, 0, 1, 1] = 0.95
    mask = torch.tensor([[[[1.0, 0.0], [0.0, 0.0]]]], dtype=torch.float64)  # pixel (0, 0) has strong noise
    if norm == "Linf":
        delta = [[[0.4, 0.3], [-0.05, 0.2]], [[0.4, 0.0], [0.3, -0.2]]]
    else:
        delta = [[[0.4, 0.3], [0.0, 0.0]], [[-0.4, 0.0], [0.4, 0.0]]]
    x_adv = x + torch.tensor([delta], dtype=torch.float64)
    projected = mask_avoiding_projection(x_adv, x, mask, norm, eps)
    torch.testing.assert_close(projected - x, torch.tensor([expected_delta], dtype=torch.float64))


@pytest.mark.parametrize("norm, eps", [("Linf", 0.05), ("L2", 0.3)])
def test_projected_perturbations_stay_off_the_mask_and_inside_the_ball_and_box(norm, eps):
    g = torch.Generator().manual_seed(0)
    x = torch.rand(8, 3, 6, 6, generator=g)
    x_adv = (x + 0.5 * torch.randn(x.shape, generator=g)).clamp(0, 1)
    mask = (torch.rand(8, 1, 6, 6, generator=g) < 0.4).float()
    projected = mask_avoiding_projection(x_adv, x, mask, norm, eps)
    delta = projected - x
    assert (delta[mask.expand_as(delta) == 1] == 0).all()
    assert (perturbation_size(delta, norm) <= eps * (1 + 1e-6)).all() and projected.min() >= 0 and projected.max() <= 1
    assert (perturbation_size(delta, norm) > 0.9 * eps).all()  # the perturbation off the mask is kept, up to the budget


# ---------------------------------------------------------------- temperatures


def test_geometric_anneal_hand_computed():
    assert geometric_schedule(0.5, 0.01, 1) == [0.5]
    three = geometric_schedule(0.5, 0.01, 3)
    assert three == pytest.approx([0.5, math.sqrt(0.5 * 0.01), 0.01])
    five = geometric_schedule(0.8, 0.05, 5)  # ratio (0.05 / 0.8)^(1/4) = 0.5 per pass
    assert five == pytest.approx([0.8, 0.4, 0.2, 0.1, 0.05])
    assert MaskAwareAPGD(steps=4, anneal=[0.8, 0.05]).temperatures() == pytest.approx(five)  # steps + 1 passes
    assert MaskAwareAPGD(steps=2).temperatures() == [0.05] * 3 and MaskAwareAPGD(steps=2, temperature=0.2).temperatures() == [0.2] * 3


def test_each_pass_runs_at_its_scheduled_temperature_and_each_restart_anneals_anew(monkeypatch):
    from hetpure_bench.defenses import hetpure

    seen, original = [], hetpure.attention_mask
    monkeypatch.setattr(hetpure, "attention_mask", lambda *a, **k: seen.append(a[3] if len(a) > 3 else None) or original(*a, **k))
    defense, x, y = _problem()
    attack = MaskAwareAPGD(steps=4, eot=1, restarts=2, anneal=[0.8, 0.05])
    attack.perturb(defense, x, y)
    assert seen == pytest.approx([0.8, 0.4, 0.2, 0.1, 0.05] * 2)  # one relaxed mask per pass, none detached


# ---------------------------------------------------------------- mask-aware-apgd


def test_a_fixed_temperature_is_apgd_against_the_relaxed_defense_bit_for_bit():
    defense, x, y = _problem()
    defense.reseed(SEEDS)
    ours, ours_history = MaskAwareAPGD(steps=3, eot=2, temperature=0.1, seed=5).perturb_with_history(defense, x, y)
    relaxed = defense.with_mask_gradient(0.1)
    relaxed.reseed(SEEDS)
    plain = APGDEOT(steps=3, eot=2, seed=5)
    reference, reference_history = plain.perturb_with_history(relaxed, x, y)
    assert torch.equal(ours, reference)
    assert torch.equal(ours_history.best_loss, reference_history.best_loss) and torch.equal(ours_history.robust, reference_history.robust)
    defense.reseed(SEEDS)
    assert not torch.equal(plain.perturb(defense, x, y), ours)  # the mask's gradient changes the attack


def test_the_relaxed_copy_draws_on_from_the_targets_streams(monkeypatch):
    draws, original = [], HeterogeneousPurifier._purify_with_mask

    def recording(self, *args, **kwargs):
        purified, noise = original(self, *args, **kwargs)
        draws.append(noise.detach().clone())  # the forward noise to t_l, a pass's first draw
        return purified, noise

    monkeypatch.setattr(HeterogeneousPurifier, "_purify_with_mask", recording)
    defense, x, y = _problem()
    defense.reseed(SEEDS)
    MaskAwareAPGD(steps=1, eot=1).perturb(defense, x, y)  # two passes: the start point, one iteration
    with torch.no_grad():
        defense(x)  # the target's next pass after the attack
        attacked = draws[:]
        draws.clear()
        defense.reseed(SEEDS)
        for _ in range(3):
            defense(x)  # the plain target's first three passes after the same reseed
    assert not torch.equal(attacked[0], attacked[1])  # the noise was not restarted between the passes
    for k in range(3):  # the passes are the target's own, and its streams went on from where the attack left them
        assert torch.equal(attacked[k], draws[k])


# ---------------------------------------------------------------- mask-avoiding-apgd


@pytest.mark.parametrize("norm, eps", [("Linf", 0.1), ("L2", 0.5)])
def test_every_iterate_leaves_the_mask_of_the_iterate_it_was_reached_from(monkeypatch, norm, eps):
    moves, constrain = [], MaskAvoidingAPGD.constrain
    monkeypatch.setattr(MaskAvoidingAPGD, "constrain",
                        lambda self, model, x_from, x_next, x: moves.append((x_from, constrain(self, model, x_from, x_next, x))) or moves[-1][1])
    defense, x, y = _problem()
    defense.reseed(SEEDS)
    x_adv = MaskAvoidingAPGD(norm=norm, eps=eps, steps=4, eot=1).perturb(defense, x, y)
    assert len(moves) == 5 and torch.equal(moves[0][0], x)  # the start point (from the clean image), then 4 steps
    for x_from, reached in moves:
        mask = _independent_mask(defense, x_from).expand_as(x)
        assert 0 < mask.mean() < 1
        delta = reached - x
        assert (delta[mask == 1] == 0).all() and (delta[mask == 0] != 0).any()
    # The returned example of every image is one of the iterates (so it obeys the same rule).
    for i in range(len(y)):
        assert any(torch.equal(x_adv[i], reached[i]) for _, reached in moves)
    defense.reseed(SEEDS)
    plain = APGDEOT(norm=norm, eps=eps, steps=4, eot=1).perturb(defense, x, y)
    assert ((plain - x)[_independent_mask(defense, x).expand_as(x) == 1] != 0).any()  # without the projection: on the mask


def test_the_attention_mask_hook_is_the_mask_purify_uses():
    defense, x, _ = _problem()
    torch.testing.assert_close(defense.attention_mask(x), defense.mask(x), rtol=0, atol=0)
    assert not defense.attention_mask(x.requires_grad_(True)).requires_grad
    with pytest.raises(UserError, match="no attention mask"):
        _hetpure("hetpure-randmask").attention_mask(x)
    with pytest.raises(UserError, match="no attention mask"):
        build_defense("none", *tiny_models()).attention_mask(x)


# ---------------------------------------------------------------- refusals and settings


@pytest.mark.parametrize("attack", ["mask-aware-apgd", "mask-avoiding-apgd"])
@pytest.mark.parametrize("defense, gradient, message", [
    ("diffpure", "full", "defense 'diffpure' has no attention mask"),
    ("none", "full", "defense 'none' has no attention mask"),
    ("hetpure-uniform-tl", "full", "has no attention mask"),
    ("hetpure-uniform-ts", "full", "has no attention mask"),
    ("hetpure-randmask", "full", "has no attention mask"),
    ("hetpure", "bpda", "needs gradients through the purifier"),
])
def test_defenses_without_a_mask_and_bpda_are_refused_in_one_line(attack, defense, gradient, message):
    with pytest.raises(UserError, match=message) as error:
        validate(spec_from_preset("smoke", defense, gradient=gradient, attack={"name": attack}))
    assert "\n" not in str(error.value) and attack in str(error.value)


@pytest.mark.parametrize("attack", ["mask-aware-apgd", "mask-avoiding-apgd"])
def test_masked_defenses_and_their_surrogates_are_accepted(attack):
    for defense, gradient in (("hetpure", "full"), ("hetpure", "surrogate:2"), ("repaint", "full"), ("hetpure-v1", "full")):
        validate(spec_from_preset("smoke", defense, gradient=gradient, attack={"name": attack}))


@pytest.mark.parametrize("cls", [MaskAwareAPGD, MaskAvoidingAPGD])
def test_a_target_without_a_mask_is_refused_at_perturb_time(cls):
    defense, x, y = _problem()
    with pytest.raises(UserError, match="needs a defense with an attention mask, not BPDA"):
        cls(steps=1, eot=1).perturb(BPDA(defense), x, y)


@pytest.mark.parametrize("settings, message", [
    ({"temperature": 0.1, "anneal": [0.5, 0.01]}, "not both"),
    ({"temperature": 0}, "temperature must be a number > 0"),
    ({"temperature": "hot"}, "temperature must be a number > 0"),
    ({"anneal": [0.5]}, r"anneal must be \[T_start, T_end\]"),
    ({"anneal": [0.5, -0.1]}, r"anneal must be \[T_start, T_end\]"),
    ({"anneal": "cold"}, r"anneal must be \[T_start, T_end\]"),
])
def test_bad_temperatures_are_one_line_errors(settings, message):
    with pytest.raises(UserError, match=message):
        build_attacks({"name": "mask-aware-apgd", **settings}, "Linf", 8 / 255, 0)


def test_names_state_loss_steps_eot_and_temperature():
    (fixed,) = build_attacks({"name": "mask-aware-apgd", "steps": 10, "eot": 2}, "Linf", 8 / 255, 0)
    (annealed,) = build_attacks({"name": "mask-aware-apgd", "anneal": "0.5,0.01", "loss": "ce"}, "L2", 0.5, 0)
    (avoiding,) = build_attacks({"name": "mask-avoiding-apgd", "steps": 10, "eot": 2, "restarts": 2}, "Linf", 8 / 255, 0)
    assert fixed.name == "APGD-EOT-mask-aware(Linf, margin, 10 iter, EOT 2, 1 restart, T 0.05)"
    assert annealed.name == "APGD-EOT-mask-aware(L2, ce, 100 iter, EOT 20, 1 restart, T 0.5 to 0.01 geometric)"
    assert avoiding.name == "APGD-EOT-mask-avoiding(Linf, margin, 10 iter, EOT 2, 2 restarts)"
    assert hash(annealed) and annealed.anneal == (0.5, 0.01)


# ---------------------------------------------------------------- the hetpure-adaptive suite


def _members(attacks):
    return [(type(a), getattr(a, "temperature", None), getattr(a, "anneal", None), a.loss, a.steps, a.eot) for a in attacks]


def test_hetpure_adaptive_builds_its_members_sized_by_the_preset():
    spec = spec_from_preset("smoke", "hetpure", attack={"name": "hetpure-adaptive"})
    attacks = build_attacks(spec.attack, "Linf", 8 / 255, 0)
    assert _members(attacks) == [
        (APGDEOT, None, None, "margin", 10, 2),
        (MaskAwareAPGD, 0.01, None, "margin", 10, 2),
        (MaskAwareAPGD, 0.05, None, "margin", 10, 2),
        (MaskAwareAPGD, 0.2, None, "margin", 10, 2),
        (MaskAwareAPGD, None, (0.5, 0.01), "margin", 10, 2),
        (MaskAvoidingAPGD, None, None, "margin", 10, 2),
    ]
    assert len(HETPURE_ADAPTIVE) == len(attacks)
    # The command line sizes every member; the strong preset sizes them its way.
    assert {a.steps for a in build_attacks(spec_from_preset("smoke", "hetpure", attack={"name": "hetpure-adaptive", "steps": 3}).attack,
                                           "Linf", 8 / 255, 0)} == {3}
    strong = build_attacks(spec_from_preset("strong", "hetpure", attack={"name": "hetpure-adaptive"}).attack, "Linf", 8 / 255, 0)
    assert {(a.steps, a.eot) for a in strong} == {(50, 4)}
    # `--attack suite` takes the mask attacks as members too.
    members = [{"name": "mask-aware-apgd", "anneal": [0.5, 0.01], "steps": 2}, {"name": "mask-avoiding-apgd", "steps": 2}]
    assert [type(a) for a in build_attacks({"name": "suite", "members": members}, "Linf", 8 / 255, 0)] == [MaskAwareAPGD, MaskAvoidingAPGD]
    with pytest.raises(UserError, match="not 'suite' or 'hetpure-adaptive'"):
        build_attacks({"name": "suite", "members": [{"name": "hetpure-adaptive"}]}, "Linf", 8 / 255, 0)
    assert "hetpure-adaptive" in ATTACKS


class HookedClassifier(nn.Module):
    """A conv layer (hooked for the mask) and a linear head on its flattened features, so that,
    unlike TinyClassifier's pooled head, its predictions vary from image to image; [0,1] input."""

    mask_hooks = ("layer1",)

    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.layer1 = nn.Sequential(nn.Conv2d(3, 4, 3, padding=1), nn.ReLU())
        self.head = nn.Linear(4 * 8 * 8, 10)

    def forward(self, x):
        return self.head(self.layer1(x).flatten(1))


N = 8  # images of the runner tests


def _tiny_hetpure_runs(monkeypatch):
    """runner.run on N generated 8x8 images with HookedClassifier and the tiny diffusion model,
    labelled by the classifier."""
    from hetpure_bench.bench import runner

    _, diffusion = tiny_models()
    classifier = HookedClassifier().eval().requires_grad_(False)
    x = torch.rand(N, 3, 8, 8, generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        labels = classifier(x).argmax(1)
    data = _Images(x, labels, torch.arange(N))
    monkeypatch.setattr(runner, "load", lambda spec, device, cache: runner.Loaded(data, classifier, diffusion))


def _adaptive_spec(defense, eps=0.02):  # a budget at which the members break different images
    from hetpure_bench.bench.spec import RunSpec

    sizes = {"steps": 1, "eot": 1}
    attack = {"name": "hetpure-adaptive", "apgd-eot": sizes, "mask-aware-apgd": sizes, "mask-avoiding-apgd": sizes}
    return RunSpec(defense=defense, n_images=N, batch_size=N, evaluation="single", sanity={"images": 0}, eps=eps,
                   attack=attack, defense_overrides=dict(TINY_HETPURE) if defense.startswith("hetpure") else {})


def test_hetpure_adaptive_row_is_the_per_image_worst_case_of_its_members(tmp_path, monkeypatch):
    from hetpure_bench.bench.runner import run

    _tiny_hetpure_runs(monkeypatch)
    with ResultStore(tmp_path / "r.sqlite") as store:
        row = run(_adaptive_spec("hetpure"), store, progress=False)[0]
        per_image = store.per_image(row["setup_hash"], "single")
    members = build_attacks(_adaptive_spec("hetpure").attack, "Linf", 0.02, 0)
    each = [per_image[f"robust_correct_{k}"] for k in range(len(members))]
    worst = each[0].copy()
    for robust in each[1:]:
        worst &= robust
    assert per_image["robust_correct"].tolist() == worst.tolist()
    assert row["robust_acc"] == worst.mean() < min(r.mean() for r in each)  # the members disagree: the worst case is none of them
    assert row["attack"] == f"hetpure-adaptive({' + '.join(a.name for a in members)})"
    parts = row["robust_by_attack"].split("; ")
    assert [p.rsplit(" ", 3)[0] for p in parts] == [a.name for a in members]
    assert [float(p.rsplit(" ", 3)[1]) for p in parts] == pytest.approx([round(100 * r.mean(), 1) for r in each])
    assert [e["attack"] for e in row["convergence"]] == [a.name for a in members]  # every member's history: converged flag


def test_hetpure_adaptive_skips_the_mask_members_where_there_is_no_mask(tmp_path, monkeypatch):
    from hetpure_bench.bench.runner import run

    _tiny_hetpure_runs(monkeypatch)
    with ResultStore(tmp_path / "r.sqlite") as store:
        row = run(_adaptive_spec("hetpure-uniform-tl"), store, progress=False)[0]
    plain, *mask_members = build_attacks(_adaptive_spec("hetpure").attack, "Linf", 0.02, 0)
    assert row["attack"] == f"hetpure-adaptive({plain.name}; skipped, not applicable: {' + '.join(a.name for a in mask_members)})"
