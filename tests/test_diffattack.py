"""DiffAttack: the deviated-reconstruction loss, the defenses' state hook, the two APGD rounds."""

import math

import pytest
import torch
from linear_models import FixedDefense, LinearClassifier, linear_problem, linf_breakable
from tiny_models import tiny_models

from hetpure_bench.attacks import attack_label, build_attacks
from hetpure_bench.attacks.apgd import APGDEOT
from hetpure_bench.attacks.diffattack import DeviationAPGD, DiffAttack, deviation_loss, state_indices
from hetpure_bench.attacks.gradients import BPDA, attack_model, check_deviation_states
from hetpure_bench.attacks.losses import LOSSES
from hetpure_bench.attacks.threat import perturbation_size
from hetpure_bench.bench.batches import attack_and_evaluate
from hetpure_bench.bench.cost import gradient_evaluations
from hetpure_bench.bench.spec import RunSpec, spec_from_preset, validate
from hetpure_bench.defenses import DEFENSES, build_defense
from hetpure_bench.defenses.base import DeviationStates, NoDefense, exposes_deviation_states
from hetpure_bench.diffusion.noise import randn_like
from hetpure_bench.diffusion.schedule import CLEAN, VPSchedule, q_sample
from hetpure_bench.diffusion.vp_sde import VPSDE, solver_times
from hetpure_bench.errors import UserError

S = VPSchedule()

# ---------------------------------------------------------------- L_dev


def _states(reverse_1):
    """Two rows of two pixels: x0 = (0.5, -0.5) and (0, 1), eps = (1, -1); states at abar 0.64
    (the start), 0.36 and 1 (the clean image)."""
    x0 = torch.tensor([[0.5, -0.5], [0.0, 1.0]], dtype=torch.float64).view(2, 1, 1, 2).requires_grad_(True)
    noise = torch.tensor([[1.0, -1.0], [1.0, -1.0]], dtype=torch.float64).view(2, 1, 1, 2)
    start = torch.full((2, 1, 1, 2), 9.0, dtype=torch.float64)  # never enters L_dev
    last = torch.zeros(2, 1, 1, 2, dtype=torch.float64)
    return DeviationStates(
        purified=torch.zeros(2, 1, 1, 2), x0=x0, noise=noise, times=(2, 1, CLEAN),
        alpha_bars=torch.tensor([0.64, 0.36, 1.0], dtype=torch.float64), reverse=(start, reverse_1, last),
    )


def test_deviation_loss_on_a_hand_computed_case():
    reverse_1 = torch.full((2, 1, 1, 2), 0.5, dtype=torch.float64, requires_grad=True)
    states = _states(reverse_1)
    # Row 0: x_1 = 0.6 x0 + 0.8 eps = (1.1, -1.1): ((0.5 - 1.1)^2 + (0.5 + 1.1)^2) / 2 = 1.46;
    # at the clean image x = x0: (0.25 + 0.25) / 2 = 0.25; L_dev = (1.46 + 0.25) / 2 = 0.855.
    # Row 1: x_1 = (0.8, -0.2): (0.09 + 0.49) / 2 = 0.29; clean: (0 + 1) / 2 = 0.5; L_dev = 0.395.
    loss = deviation_loss(states)
    torch.testing.assert_close(loss, torch.tensor([0.855, 0.395], dtype=torch.float64))
    torch.testing.assert_close(deviation_loss(states, sampled=1), torch.tensor([0.25, 0.5], dtype=torch.float64))
    # d/dx'_1 of row 0: 2 (x'_1 - x_1) / 2 pixels / 2 states; the target x_t is detached.
    loss.sum().backward()
    torch.testing.assert_close(reverse_1.grad[0].flatten(), torch.tensor([-0.3, 0.8], dtype=torch.float64))
    assert states.x0.grad is None


def test_state_indices_leave_out_the_start_and_keep_the_last():
    assert state_indices(11) == list(range(1, 11))
    assert state_indices(11, 3) == [4, 7, 10]
    assert state_indices(11, 1) == [10]
    assert state_indices(11, 10) == state_indices(11, 50) == list(range(1, 11))
    assert state_indices(2) == [1]
    with pytest.raises(ValueError):
        state_indices(1)


# ---------------------------------------------------------------- the defenses' hook

HOOKED = [
    ("diffpure", {"t_star": 0.005}, [5, 4, 3, 2, 1, 0, CLEAN]),  # ddpm
    ("diffpure", {"sampler": "ddim", "ddim_stride": 25}, [100, 75, 50, 25, CLEAN]),
    ("hetpure", {"stride": 50}, [200, 150, 100, 50, 0]),
    ("hetpure-uniform-ts", {"stride": 100, "final_step": "clean"}, [200, 100, CLEAN]),
    ("hetpure-multistep", {"stride": 100, "resample_steps": 1}, [200, 100, 200, 100, 0]),
    ("repaint", {"stride": 50, "resample_steps": 1}, [200, 150, 200, 150, 100, 150, 100, 50, 100, 50, CLEAN]),
]


def _x(n=2, seed=0):
    return torch.rand(n, 3, 8, 8, generator=torch.Generator().manual_seed(seed))


@pytest.mark.parametrize("name, overrides, times", HOOKED)
def test_the_hook_is_purify_itself_with_the_states_of_its_loop(name, overrides, times):
    classifier, diffusion = tiny_models()
    defense = build_defense(name, classifier, diffusion, overrides, seed=[3, 4])
    x = _x()
    with torch.no_grad():
        purified = defense.purify(x)
        defense.reseed([3, 4])
        states = defense.deviation_states(x)
        defense.reseed([3, 4])
        first_draw = randn_like(x, defense.generator(x))  # the first draw of a purification
    assert torch.equal(states.purified, purified)
    assert list(states.times) == times and len(states.reverse) == len(times)
    assert torch.equal(states.alpha_bars, S.alpha_bar(torch.tensor(times)))
    # The forward noise is the noising's own: x_t at the start IS the sampler's starting state.
    assert torch.equal(states.noise, first_draw)
    assert torch.equal(states.diffused(0), states.reverse[0])
    assert torch.equal(states.reverse[0], q_sample(S, x * 2 - 1, times[0], noise=first_draw))
    assert torch.equal(((states.reverse[-1] + 1) / 2).clamp(0, 1), purified)  # the last state is the result
    assert (deviation_loss(states) > 0).all()


def test_diffpure_sde_states_use_the_continuous_alpha_bar_at_the_solver_times():
    classifier, diffusion = tiny_models()
    continuous = build_defense("diffpure", classifier, diffusion, {"sampler": "sde", "sde_dt": 0.025, "sde_forward": "continuous"}, seed=1)
    x = _x()
    for defense, start_gap in ((continuous, 1e-6), (continuous.replace(sde_forward="discrete"), 1e-2)):
        forward = defense.config.sde_forward
        with torch.no_grad():
            purified = defense.purify(x)
            defense.reseed(1)
            states = defense.deviation_states(x)
        times = solver_times(0.1, 1e-5, 0.025)
        assert torch.equal(states.purified, purified) and list(states.times) == times
        torch.testing.assert_close(states.alpha_bars, torch.tensor([VPSDE().alpha_bar(t) for t in times], dtype=torch.float64))
        gap = (states.diffused(0) - states.reverse[0]).abs().max().item()
        # continuous forward: the same pair up to float32 rounding; discrete: alpha_bar 0.89702 vs 0.8963
        assert gap < start_gap and (forward == "continuous" or gap > 1e-4)


def test_the_hook_keeps_the_graph_and_l_dev_has_an_input_gradient():
    classifier, diffusion = tiny_models()
    defense = build_defense("hetpure", classifier, diffusion, {"stride": 100}, seed=0)
    x = _x().requires_grad_(True)
    grad, = torch.autograd.grad(deviation_loss(defense.deviation_states(x)).sum(), x)
    assert torch.isfinite(grad).all() and (grad.flatten(1).norm(dim=1) > 0).all()


def test_which_defenses_expose_states():
    exposed = {name for name in DEFENSES.names() if exposes_deviation_states(DEFENSES.build(name))}
    assert exposed == set(DEFENSES.names()) - {"none", "gdmp"}
    classifier, diffusion = tiny_models()
    for name in ("none", "gdmp"):
        defense = build_defense(name, classifier, diffusion)
        with pytest.raises(UserError, match=f"defense '{name}' exposes no reverse-process states: diffattack needs them"):
            defense.deviation_states(_x())


# ---------------------------------------------------------------- the attack


class StatesOf(FixedDefense):
    """purify = identity; the loop's states are ``reverse(x0)`` for x0 = 2 x - 1 in [-1,1], at the
    noise levels ``alpha_bars``, with a fixed forward noise: L_dev in closed form."""

    def __init__(self, classifier, reverse, alpha_bars):
        super().__init__(classifier, None, None, 0)
        self.reverse, self.alpha_bars = reverse, torch.tensor(alpha_bars, dtype=torch.float64)

    def purify(self, x01):
        return x01

    def deviation_states(self, x01):
        x0 = x01 * 2 - 1
        noise = torch.linspace(-1, 1, x0[0].numel(), dtype=x0.dtype).view_as(x0[0]).expand_as(x0)
        reverse = tuple(state for state in self.reverse(x0))
        return DeviationStates(x01, x0, noise, tuple(range(len(reverse))), self.alpha_bars, reverse)


def _constant_states(classifier):
    """States that do not depend on the input, against targets that do not either (abar 0:
    pure noise): L_dev is a constant with zero gradient."""
    return StatesOf(classifier, lambda x0: (torch.zeros_like(x0), torch.full_like(x0, 0.3)), [0.0, 0.0])


def _binary_problem():
    """As test_apgd's: a float64 two-class linear model, class 0 for every image."""
    g = torch.Generator().manual_seed(0)
    weight = torch.randn(2, 48, generator=g, dtype=torch.float64)
    x = 0.3 + 0.4 * torch.rand(3, 3, 4, 4, generator=g, dtype=torch.float64)
    model = LinearClassifier(weight, torch.tensor([2.0, 0.0], dtype=torch.float64)).eval()
    return model, x, torch.zeros(3, dtype=torch.long), (weight[0] - weight[1]).view(1, 3, 4, 4)


@pytest.mark.parametrize("norm, eps, steps", [("Linf", 0.05, 20), ("L2", 0.3, 50)])
def test_reaches_the_closed_form_optimum_when_l_dev_is_constant(norm, eps, steps):
    model, x, y, w_diff = _binary_problem()
    attack = DiffAttack(norm=norm, eps=eps, steps=steps, eot=1, losses=("ce", "margin"))
    x_adv = attack.perturb(_constant_states(model), x, y)
    optimum = x - eps * (w_diff.sign() if norm == "Linf" else w_diff / w_diff.norm()).expand_as(x)
    torch.testing.assert_close(x_adv, optimum, atol=1e-5, rtol=1e-5)


def test_finds_every_breakable_image_of_a_multiclass_linear_model():
    model, x, y = linear_problem(n=16)
    eps = 0.03
    breakable = linf_breakable(model, x, y, eps)
    x_adv = DiffAttack(eps=eps, steps=25, eot=1).perturb(_constant_states(model), x, y)  # ce, then dlr
    with torch.no_grad():
        assert (model(x_adv).argmax(1) == y).tolist() == (~breakable).tolist()


def test_with_a_constant_classifier_it_maximises_l_dev():
    """Zero logits (every L_cls constant); the last state doubles the input, the target is the
    input itself (abar 1): L_dev = mean(x0^2), maximised at x + eps sign(2x - 1)."""
    model = LinearClassifier(torch.zeros(3, 48, dtype=torch.float64), torch.zeros(3, dtype=torch.float64))
    defense = StatesOf(model, lambda x0: (x0, 2 * x0), [0.5, 1.0])
    g = torch.Generator().manual_seed(1)
    x = 0.2 + 0.2 * torch.rand(3, 3, 4, 4, generator=g, dtype=torch.float64)
    x = torch.where(torch.rand(x.shape, generator=g) < 0.5, 1 - x, x)  # at least 0.1 from 0.5: no start across it
    eps = 0.05
    x_adv, history = DiffAttack(eps=eps, steps=10, eot=1).perturb_with_history(defense, x, torch.zeros(3, dtype=torch.long))
    torch.testing.assert_close(x_adv, x + eps * (2 * x - 1).sign())
    # DLR of zero logits is 0, so round 2's best loss is L_dev of its best iterate
    torch.testing.assert_close(history.best_loss[-1], ((2 * x_adv - 1) ** 2).flatten(1).mean(1))


def test_with_lambda_zero_and_one_round_it_is_apgd_eot_exactly():
    classifier, diffusion = tiny_models()
    defense = build_defense("diffpure", classifier, diffusion, {"sampler": "ddim", "ddim_stride": 25})
    x, y = _x(), torch.tensor([1, 2])
    results = []
    for attack in (DiffAttack(eps=8 / 255, steps=3, eot=2, lam=0.0, losses=("margin",), seed=5),
                   APGDEOT(eps=8 / 255, loss="margin", steps=3, eot=2, seed=5)):
        defense.reseed([1, 2])
        results.append(attack.perturb_with_history(defense, x, y))
    (ours, history), (theirs, reference) = results
    assert torch.equal(ours, theirs)
    for field in ("robust", "best_loss", "step_size"):
        assert torch.equal(getattr(history, field), getattr(reference, field)), field
    defense.reseed([1, 2])
    with_dev = DiffAttack(eps=8 / 255, steps=3, eot=2, losses=("margin",), seed=5).perturb_with_history(defense, x, y)[1]
    assert not torch.equal(with_dev.best_loss, reference.best_loss)  # lambda = 1 adds L_dev


def test_two_rounds_ce_then_dlr_the_second_from_the_firsts_best():
    model, x, y = linear_problem(n=4)
    defense = StatesOf(model, lambda x0: (x0, 0.5 * x0 + 0.1), [0.5, 0.9])
    seen = []
    original = defense.deviation_states
    defense.deviation_states = lambda copies: seen.append(copies.detach().clone()) or original(copies)
    steps, eot = 4, 2
    x_adv, history = DiffAttack(eps=0.03, steps=steps, eot=eot, seed=2).perturb_with_history(defense, x, y)
    assert len(seen) == 2 * (steps + 1) and history.robust.shape == (2 * (steps + 1), 4)
    first_best = DeviationAPGD(eps=0.03, loss="ce", steps=steps, eot=eot, seed=2).perturb(defense, x, y)
    torch.testing.assert_close(seen[steps + 1], first_best.repeat(eot, 1, 1, 1), atol=1e-7, rtol=0)  # round 2 starts there
    # each round's records are its own objective: L_cls + L_dev at its start point
    for record, loss in ((0, "ce"), (steps + 1, "dlr")):
        start = seen[record][:4]
        states = original(start)
        expected = LOSSES[loss](model(start), y) + deviation_loss(states)
        torch.testing.assert_close(history.best_loss[record], expected)
    assert torch.equal(history.step_size[steps + 1], torch.full((4,), 0.06))  # round 2 from 2 eps


@pytest.mark.parametrize("norm, eps", [("Linf", 8 / 255), ("L2", 0.5)])
def test_through_the_runner_in_the_ball_and_eps_zero_is_the_identity(norm, eps):
    classifier, diffusion = tiny_models()
    defense = build_defense("hetpure", classifier, diffusion, {"stride": 100})
    x, y, index = _x(), torch.tensor([0, 1]), torch.arange(2)
    attack = DiffAttack(norm=norm, eps=eps, steps=2, eot=1, sampled_steps=1)
    per_image = attack_and_evaluate(defense, defense, [attack], x, y, index, RunSpec(defense="hetpure", threat=norm, eps=eps), progress=False)
    assert len(per_image) == 2  # the runner checked the ball and the box
    defense.reseed(0)
    x_adv = attack.perturb(defense, x, y)
    assert (perturbation_size(x_adv - x, norm) <= eps * (1 + 1e-6)).all() and x_adv.min() >= 0 and x_adv.max() <= 1
    assert torch.equal(attack.replace(eps=0.0, steps=1).perturb(defense, x, y), x)


# ---------------------------------------------------------------- refusals, registry, cost


def test_refusals_are_one_line_before_any_heavy_work():
    with pytest.raises(UserError, match="defense 'gdmp' exposes no reverse-process states: diffattack needs them"):
        validate(RunSpec(defense="gdmp", attack={"name": "diffattack"}))
    with pytest.raises(UserError, match="defense 'none' exposes no reverse-process states"):
        validate(RunSpec(defense="none", attack={"name": "diffattack"}))
    with pytest.raises(UserError, match="diffattack needs gradients through the purifier"):
        validate(RunSpec(defense="diffpure", attack={"name": "diffattack"}, gradient="bpda"))
    for name in ("diffpure", "hetpure", "repaint"):
        for gradient in ("full", "surrogate:2"):
            validate(RunSpec(defense=name, attack={"name": "diffattack"}, gradient=gradient))
    validate(RunSpec(defense="hetpure", attack={"name": "diffattack", "mask_aware": 0.05}))


def test_refusals_at_perturb_time_too():
    classifier, diffusion = tiny_models()
    defense = build_defense("diffpure", classifier, diffusion, {"sampler": "ddim", "ddim_stride": 50})
    x, y = _x(), torch.tensor([0, 1])
    with pytest.raises(UserError, match="needs the defense itself.*not BPDA"):
        DiffAttack(steps=1, eot=1).perturb(attack_model(defense, "bpda"), x, y)
    with pytest.raises(UserError, match="exposes no reverse-process states"):
        DiffAttack(steps=1, eot=1).perturb(NoDefense(classifier, None), x, y)
    with pytest.raises(UserError, match="gradients through the purifier"):
        check_deviation_states("bpda", defense)
    check_deviation_states("surrogate:1", defense.surrogate(1))
    assert isinstance(attack_model(defense, "bpda"), BPDA)


@pytest.mark.parametrize("settings", [
    {"lam": -1}, {"lam": "big"}, {"sampled_steps": 0}, {"sampled_steps": 1.5}, {"losses": []},
    {"losses": "ce,foo"}, {"eot": 0}, {"steps": -1}, {"restarts": 0}, {"step_size": 0.1},
])
def test_bad_settings_are_one_line_user_errors(settings):
    with pytest.raises(UserError):
        build_attacks({"name": "diffattack", **settings}, "Linf", 0.03, 0)


def test_registry_name_cost_and_smoke_settings():
    attacks = build_attacks({"name": "diffattack", "steps": 5, "losses": ["ce", "dlr"], "sampled_steps": 4}, "L2", 0.5, 3)
    assert attacks == [DiffAttack(norm="L2", eps=0.5, steps=5, sampled_steps=4, seed=3)]
    hash(attacks[0])  # a list of losses from YAML became a tuple: the attack stays hashable
    assert attack_label(attacks, None) == "DiffAttack(L2, ce then dlr, lambda 1, 5 iter, EOT 20, 1 restart, L_dev on 4 steps)"
    assert build_attacks({"name": "diffattack", "losses": "dlr", "lam": 0.1}, "Linf", 0.03, 0)[0].name == \
        "DiffAttack(Linf, dlr, lambda 0.1, 100 iter, EOT 20, 1 restart)"
    assert gradient_evaluations(DiffAttack(steps=5, eot=2, restarts=3)) == 2 * 3 * 6 * 2  # rounds x restarts x passes x copies
    smoke = spec_from_preset("smoke", "diffpure", attack={"name": "diffattack"})
    assert build_attacks(smoke.attack, smoke.threat, smoke.eps, smoke.seed)[0] == DiffAttack(eps=8 / 255, steps=5, eot=2)
    assert math.isclose(DiffAttack().eps, 8 / 255)
