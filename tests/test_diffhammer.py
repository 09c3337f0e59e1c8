import math

import pytest
import torch
from linear_models import FixedDefense, LinearClassifier, linear_problem, linf_breakable
from tiny_models import tiny_models
from torch import nn

from hetpure_bench.attacks import attack_label, build_attacks
from hetpure_bench.attacks.diffhammer import DiffHammer, e_step_log_weights, graft, representative
from hetpure_bench.attacks.gradients import BPDA, attack_model
from hetpure_bench.attacks.losses import loss_function
from hetpure_bench.attacks.threat import perturbation_size, project
from hetpure_bench.bench.cost import forward_queries, gradient_evaluations
from hetpure_bench.defenses import build_defense
from hetpure_bench.diffusion.noise import CopyReplay, rand_like, randn_like, stream_seed
from hetpure_bench.errors import UserError

# ---------------------------------------------------------------- the EM step on constructed cases

LOSSES = torch.tensor([[0.2, -0.5], [-1.0, 0.3], [0.5, -0.2]], dtype=torch.float64)  # (N = 3, B = 2)
GRADS = torch.tensor([  # (N, B, D = 2)
    [[1.0, 2.0], [2.0, -1.0]],
    [[-1.0, 0.5], [1.0, 1.0]],
    [[0.5, -2.0], [-3.0, 0.5]],
], dtype=torch.float64)


def _elu(z):
    return z if z > 0 else math.exp(z) - 1


def _unit(v, norm):
    return [(a > 0) - (a < 0) for a in v] if norm == "Linf" else [a / math.hypot(*v) for a in v]


def _dot(u, v):
    return sum(a * b for a, b in zip(u, v))


@pytest.mark.parametrize("norm, eps", [("Linf", 0.1), ("L2", 0.1), ("Linf", 0.5), ("L2", 0.5)])
def test_representative_maximises_the_summed_elu_of_the_first_order_losses(norm, eps):
    chosen = representative(LOSSES, GRADS, eps, norm)
    for b in range(2):
        L, g = LOSSES[:, b].tolist(), GRADS[:, b].tolist()
        scores = [sum(_elu(L[i] + eps * _dot(_unit(g[j], norm), g[i])) for i in range(3)) for j in range(3)]
        assert int(chosen[b]) == scores.index(max(scores))
    assert chosen.tolist() == [0, 2]  # worked out by hand for every case above: clear winners


def test_e_step_log_weights_by_hand():
    chosen = torch.tensor([0, 2])
    sig = lambda z: 1 / (1 + math.exp(-z))  # noqa: E731
    # image 0, j* = 0: sign(1, 2) = (1, 1); <(1,1), g_i> = 3, -0.5, -1.5
    # image 1, j* = 2: sign(-3, 0.5) = (-1, 1); <(-1,1), g_i> = -3, 0, 3.5
    expected = [[sig(5 * (0.2 + 3)), sig(5 * (-0.5 - 3))],
                [sig(5 * (-1.0 - 0.5)), sig(5 * (0.3 + 0))],
                [sig(5 * (0.5 - 1.5)), sig(5 * (-0.2 + 3.5))]]
    torch.testing.assert_close(e_step_log_weights(LOSSES, GRADS, chosen, "Linf").exp(), torch.tensor(expected, dtype=torch.float64))
    # L2, image 0: u = (1, 2) / sqrt(5); <u, g_i> = 5, 0, -3.5 over sqrt(5)
    l2 = e_step_log_weights(LOSSES, GRADS, chosen, "L2")[:, 0].exp()
    s5 = math.sqrt(5)
    torch.testing.assert_close(l2, torch.tensor([sig(5 * (0.2 + 5 / s5)), sig(5 * (-1.0)), sig(5 * (0.5 - 3.5 / s5))], dtype=torch.float64))


def test_graft_is_the_weighted_mean_and_identical_gradients_graft_to_themselves():
    weights = torch.tensor([[1.0, 0.5], [3.0, 0.5], [0.0, 1.0]], dtype=torch.float64)
    grafted = graft(GRADS, weights.log())
    torch.testing.assert_close(grafted[0], torch.tensor([(1 - 3) / 4, (2 + 1.5) / 4], dtype=torch.float64))
    torch.testing.assert_close(grafted[1], torch.tensor([(1 + 0.5 - 3) / 2, (-0.5 + 0.5 + 0.5) / 2], dtype=torch.float64))
    same = GRADS[:1].expand(4, -1, -1)
    torch.testing.assert_close(graft(same, torch.randn(4, 2, dtype=torch.float64)), GRADS[0])
    # weights far below float32's smallest number still graft to their weighted mean
    tiny = torch.tensor([[-200.0], [-200.0 + math.log(3)]])  # q = e^-200 and 3 e^-200
    torch.testing.assert_close(graft(torch.tensor([[[1.0]], [[5.0]]]), tiny), torch.tensor([[4.0]]))
    assert float(torch.sigmoid(torch.tensor(-200.0))) == 0.0  # what plain weights would have been


# ---------------------------------------------------------------- test defenses


class Smooth(FixedDefense):
    """A deterministic, non-linear purifier: every purification is the same."""

    def purify(self, x01):
        return torch.sigmoid(4 * (x01 - 0.5)) * 0.9 + 0.05


class Noisy(FixedDefense):
    """Identity plus Gaussian noise of std ``sigma`` from the defense's own streams."""

    sigma = 0.3

    def purify(self, x01):
        return x01 + self.sigma * randn_like(x01, self.generator(x01))


def _tiny_problem(n=3, seed=0):
    classifier, diffusion = tiny_models()
    x = torch.rand(n, 3, 8, 8, generator=torch.Generator().manual_seed(seed))
    with torch.no_grad():
        y = classifier(x).argmax(1)
    return classifier, diffusion, x, y


def test_identical_purifications_graft_to_the_plain_gradient_through_one_purification():
    classifier, _, x, y = _tiny_problem()
    defense = Smooth(classifier, None)
    ev = DiffHammer(purifications=4).evaluate(defense, x, y, "margin", gradient=True)
    x_in = x.clone().requires_grad_(True)
    plain, = torch.autograd.grad(loss_function("margin")(classifier(defense.purify(x_in)), y).sum(), x_in)
    torch.testing.assert_close(ev.gradient, plain)
    assert ev.replay_deviation == 0.0


# ---------------------------------------------------------------- the exact trajectory

TINY_DEFENSES = [
    ("diffpure", {"t_star": 0.004}),  # DDPM: 5 calls, noise at every step
    ("diffpure", {"sampler": "sde", "t_star": 0.04, "sde_dt": 0.01}),
    ("hetpure", {"t_l": 40, "t_s": 20, "stride": 20}),
    ("hetpure-randmask", {"t_l": 40, "t_s": 20, "stride": 20}),
    ("repaint", {"t_l": 40, "stride": 20, "resample_steps": 1}),
    ("gdmp", {"t_guide": 3, "iterations": 1, "paths": 1}),
]


def _seeded(name, overrides, classifier, diffusion, n):
    defense = build_defense(name, classifier, diffusion, overrides)
    defense.reseed([stream_seed(0, i, "attack") for i in range(n)])
    return defense


class TwoDraws(FixedDefense):
    """Batch-independent arithmetic (no matrix products, whose rounding depends on the number
    of rows) and two draws of different shapes per purification, as the samplers interleave."""

    def purify(self, x01):
        g = self.generator(x01)
        scale = rand_like(x01[:, :1], g)
        return x01 * scale + 0.2 * randn_like(x01, g)


@pytest.mark.parametrize("seed", [[11, 12, 13], 7])  # per-image streams, one shared stream
def test_the_replayed_representative_equals_its_forward_copy_bit_for_bit(seed):
    """The noise of copy j* of each image is replayed exactly: recomputed with a graph, the
    representative purification is bit for bit the batched pass's copy (in-repo defenses differ
    only by the rounding of batch-size-dependent matrix products, next test)."""
    classifier, _, x, y = _tiny_problem()
    defense, twin = TwoDraws(classifier, None, seed=seed), TwoDraws(classifier, None, seed=seed)
    n = 4
    snapshot = defense.noise.snapshot()
    with torch.no_grad():
        forward = defense.purify(x.repeat(n, 1, 1, 1)).view(n, len(y), *x.shape[1:])
    chosen = torch.tensor([2, 0, 3])
    with defense.drawing_noise_from(CopyReplay(snapshot, n, chosen)):
        replayed = defense.purify(x.clone().requires_grad_(True))
    assert torch.equal(replayed.detach(), forward[chosen, torch.arange(3)])
    ev = DiffHammer(purifications=n).evaluate(twin, x, y, "margin", gradient=True)
    assert ev.replay_deviation == 0.0
    assert torch.equal(defense.purify(x), twin.purify(x))  # the replays advanced no stream


@pytest.mark.parametrize("name, overrides", TINY_DEFENSES)
def test_the_replayed_representative_matches_its_forward_copy_in_every_defense(name, overrides):
    """Up to the rounding of matrix products over 3 vs 9 rows (the project's batch-independence
    tolerance, test_noise), while another copy's noise is far off; the replay advances none of
    the defense's streams: its next purification is that of a twin that only ran the batched pass."""
    classifier, diffusion, x, y = _tiny_problem()
    defense, twin, other = (_seeded(name, overrides, classifier, diffusion, len(y)) for _ in range(3))
    n = 3
    ev = DiffHammer(purifications=n).evaluate(defense, x, y, "margin", gradient=True)
    assert ev.replay_deviation <= 1e-6
    with torch.no_grad():
        twin.purify(x.repeat(n, 1, 1, 1))
        assert torch.allclose(defense.purify(x), twin.purify(x), atol=1e-6, rtol=0)
        snapshot = other.noise.snapshot()
        forward = other.purify(x.repeat(n, 1, 1, 1)).view(n, len(y), *x.shape[1:])
        with other.drawing_noise_from(CopyReplay(snapshot, n, torch.tensor([1, 1, 1]))):
            replayed = other.purify(x)
    assert torch.allclose(replayed, forward[1], atol=1e-6, rtol=0)
    assert (replayed - forward[0]).abs().max() > 1e-3


def test_the_replay_gradient_equals_the_batched_graph_restricted_to_the_representative():
    """An independent computation of J_phi_j*^T g~: all N purifications with a graph, from the
    same noise, the grafted gradient fed into the representative's rows only."""
    classifier, diffusion, x, y = _tiny_problem()
    name, overrides = TINY_DEFENSES[0]
    defense, twin = (_seeded(name, overrides, classifier, diffusion, len(y)) for _ in range(2))
    n, eps = 4, 8 / 255
    ev = DiffHammer(eps=eps, purifications=n).evaluate(defense, x, y, "ce", gradient=True)

    x_in = x.clone().requires_grad_(True)
    purified = twin.purify(x_in.repeat(n, 1, 1, 1))
    p = purified.detach().requires_grad_(True)
    losses = loss_function("ce")(classifier(p), y.repeat(n))
    grads, = torch.autograd.grad(losses.sum(), p)
    losses, grads = losses.detach().view(n, -1), grads.view(n, len(y), -1)
    chosen = representative(losses, grads, eps, "Linf")
    weights = torch.sigmoid(5 * (losses + (grads * grads[chosen, torch.arange(len(y))].sign()).sum(-1)))
    grafted = (weights.unsqueeze(-1) * grads).sum(0) / weights.sum(0).unsqueeze(-1)  # plainly, from ATTACKS.md
    outputs = torch.zeros(n, len(y), grads.shape[-1])
    outputs[chosen, torch.arange(len(y))] = grafted
    expected, = torch.autograd.grad(purified, x_in, grad_outputs=outputs.view_as(purified))
    assert len(set(chosen.tolist())) > 1 or chosen.tolist() != [0] * len(y)  # not trivially copy 0
    torch.testing.assert_close(ev.gradient, expected)
    torch.testing.assert_close(ev.losses, losses)


# ---------------------------------------------------------------- closed-form optima


def _binary_problem():
    """As in test_apgd, but every image of class 0 and robust even at the optimum (bias 15), so
    that the highest-loss iterate is returned; float64; the best move is along -(w_0 - w_1)."""
    g = torch.Generator().manual_seed(0)
    weight = torch.randn(2, 48, generator=g, dtype=torch.float64)
    x = 0.3 + 0.4 * torch.rand(3, 3, 4, 4, generator=g, dtype=torch.float64)
    model = LinearClassifier(weight, torch.tensor([15.0, 0.0], dtype=torch.float64)).eval()
    return model, x, torch.zeros(3, dtype=torch.long), (weight[0] - weight[1]).view(1, 3, 4, 4)


class Identity(FixedDefense):
    def purify(self, x01):
        return x01


def test_linf_reaches_the_closed_form_optimum():
    model, x, y, w_diff = _binary_problem()
    eps = 0.05
    x_adv, history = DiffHammer(eps=eps, losses="margin,ce", steps=20, purifications=2).perturb_with_history(Identity(model, None), x, y)
    optimum = x - eps * w_diff.sign().expand_as(x)
    torch.testing.assert_close(x_adv, optimum)
    assert (model(optimum).argmax(1) == 0).all() and not history.wor[-1].any()


def test_l2_reaches_the_closed_form_optimum():
    model, x, y, w_diff = _binary_problem()
    eps = 0.3
    x_adv = DiffHammer(norm="L2", eps=eps, losses="margin,ce", steps=50, purifications=2).perturb(Identity(model, None), x, y)
    torch.testing.assert_close(x_adv, x - eps * (w_diff / w_diff.norm()).expand_as(x), atol=1e-5, rtol=1e-5)


def test_finds_every_breakable_image_of_a_multiclass_linear_model():
    model, x, y = linear_problem(n=16)
    eps = 0.03
    breakable = linf_breakable(model, x, y, eps)
    assert 0 < breakable.sum() < len(y)
    x_adv, history = DiffHammer(eps=eps, steps=30, purifications=1).perturb_with_history(Identity(model, None), x, y)
    with torch.no_grad():
        assert (model(x_adv).argmax(1) == y).tolist() == (~breakable).tolist()
    assert history.worst_broken.tolist() == breakable.tolist()
    assert history.avg_success.tolist() == breakable.float().tolist()


# ---------------------------------------------------------------- steps, smoothing, N-evaluation


class Scripted(nn.Module):
    """Two-class logits whose margin at call t is ``scripts[t]`` (per image), with the input
    gradient ``directions[t]``; records its inputs."""

    def __init__(self, scripts, directions):
        super().__init__()
        self.scripts, self.directions, self.inputs = scripts, directions, []

    def forward(self, p):
        t = len(self.inputs)
        self.inputs.append(p.detach().clone())
        linear = (p * self.directions[t]).flatten(1).sum(1)
        value = self.scripts[t] + (linear - linear.detach())
        return torch.stack([torch.zeros_like(value), value], 1)


def test_steps_follow_the_smoothed_gradient_with_apgd_momentum():
    """A plain re-implementation of the first steps (L2, so the smoothing shows in the
    direction): call 0 is the clean image, call 1 the start point, then one call per step."""
    g = torch.Generator().manual_seed(0)
    directions = torch.randn(8, 2, 3, 2, 2, generator=g, dtype=torch.float64)
    x = 0.3 + 0.4 * torch.rand(2, 3, 2, 2, generator=g, dtype=torch.float64)
    scripts = -10 + torch.arange(8, dtype=torch.float64).view(-1, 1).expand(8, 2)  # rising: no halving
    model = Scripted(scripts, directions)
    eps = 0.5
    attack = DiffHammer(norm="L2", eps=eps, losses="margin", steps=6, purifications=1)
    attack.perturb(Identity(model, None), x, torch.zeros(2, dtype=torch.long))
    inputs = model.inputs
    assert torch.equal(inputs[0], x)

    def unit(v):
        return v / v.flatten(1).norm(dim=1).view(-1, 1, 1, 1)

    def proj(v):
        return project(v, x, "L2", eps)

    x0, x1 = inputs[1], inputs[2]
    torch.testing.assert_close(x1, proj(x0 + 2 * eps * unit(directions[1])))
    smoothed = 2 ** -0.5 * directions[2] + (1 - 2 ** -0.5) * directions[1]
    z = proj(x1 + 2 * eps * unit(smoothed))
    torch.testing.assert_close(inputs[3], proj(x1 + 0.75 * (z - x1) + 0.25 * (x1 - x0)))


def test_avg_and_wor_against_the_recorded_purifications():
    """Avg and Wor recomputed from the classifier's calls (the clean image's first), and the
    returned example is the iterate with the highest fraction misclassified."""
    model, x, y = linear_problem(n=4)
    purified_inputs = []

    class Recording(Noisy):
        sigma = 0.1

        def purify(self, x01):
            purified_inputs.append(x01.detach().clone())
            return super().purify(x01)

    logits_seen = []

    class Spy(nn.Module):
        def forward(self, p):
            out = model(p)
            logits_seen.append(out.detach())
            return out

    n = 5
    defense = Recording(Spy(), None, seed=[1, 2, 3, 4])
    attack = DiffHammer(eps=0.005, losses="margin", steps=6, purifications=n, restart_threshold=1.0)
    x_adv, history = attack.perturb_with_history(defense, x, y)
    wrong = torch.stack([(logits.argmax(1) != y.repeat(n)).view(n, -1) for logits in logits_seen])  # (calls, N, B)
    assert torch.equal(history.wor[-1], wrong.any(1).any(0))
    torch.testing.assert_close(history.avg[-1], wrong.float().mean(1).amax(0))
    assert torch.equal(history.avg, torch.cummax(wrong.float().mean(1), 0).values)
    assert (history.avg[0] * n).round().tolist() == [0, 0, 1, 0]  # the clean image counts: 1 of 5 wrong
    assert 0 < history.avg[-1].sum() and not history.wor[-1].all()  # a case that tells something
    iterates = [inputs[: len(y)] for inputs in purified_inputs if len(inputs) == n * len(y)]  # not the replays
    assert torch.equal(iterates[0], x)
    frac = wrong.float().mean(1)
    for b in range(len(y)):
        top = frac[1:, b].max()  # an attacked iterate wins a tie with the clean image
        returned = [k for k in range(1, len(iterates)) if frac[k, b] == top] if top >= frac[0, b] else [0]
        assert any(torch.equal(x_adv[b], iterates[k][b]) for k in returned), b
    assert history.robust.shape == history.avg.shape == (len(iterates), len(y))


def test_later_restarts_attack_only_images_whose_average_success_is_low():
    model, x, y = linear_problem(n=16)
    eps = 0.03
    breakable = linf_breakable(model, x, y, eps)
    rows_seen = []

    class Counting(Identity):
        def purify(self, x01):
            rows_seen.append(x01.shape[0])
            return x01

    steps = 8
    _, history = DiffHammer(eps=eps, losses=("margin", "ce"), steps=steps, purifications=2).perturb_with_history(
        Counting(model, None), x, y)
    unbroken = int((~breakable).sum())
    evaluations = [r for r in rows_seen if r % 2 == 0 and r >= 2 * unbroken][-(steps + 1):]
    assert evaluations == [2 * unbroken] * (steps + 1)  # the second restart: only the unbroken images
    last = history.step_size[-1]
    assert (last[breakable] == 0).all() and (last[~breakable] > 0).all()


def test_a_restart_stops_once_every_purification_is_misclassified():
    model, x, y = linear_problem(n=4)
    calls = []

    class Counting(Identity):
        def purify(self, x01):
            calls.append(x01.shape[0])
            return x01

    _, history = DiffHammer(eps=1.0, steps=20, purifications=2).perturb_with_history(Counting(model, None), x, y)
    assert history.wor[-1].all() and history.avg[-1].tolist() == [1.0] * 4
    assert len(history.avg) < 1 + 21  # stopped early, and no later restart
    assert not history.robust[-1].any()


@pytest.mark.parametrize("norm, eps", [("Linf", 0.1), ("L2", 1.0)])
def test_results_stay_in_the_ball_and_the_box(norm, eps):
    model, x, y = linear_problem(n=6)
    x = x.clone()
    x[:3] = (x[:3] > 0.5).to(x.dtype)  # images at the box edges
    x_adv = DiffHammer(norm=norm, eps=eps, steps=5, purifications=3).perturb(Noisy(model, None, seed=[1, 2, 3, 4, 5, 6]), x, y)
    assert (perturbation_size(x_adv - x, norm) <= eps * (1 + 1e-6)).all()
    assert x_adv.min() >= 0 and x_adv.max() <= 1


def test_the_global_rng_is_untouched_and_the_seed_decides():
    model, x, y = linear_problem(n=3)
    results = []
    for global_seed in (1, 2):
        torch.manual_seed(global_seed)
        state = torch.get_rng_state()
        results.append(DiffHammer(eps=0.03, steps=3, purifications=2, seed=5).perturb(Noisy(model, None, seed=[1, 2, 3]), x, y))
        assert torch.equal(torch.get_rng_state(), state)
    assert torch.equal(results[0], results[1])


# ---------------------------------------------------------------- refusals, registry, cost


def test_bpda_and_bare_modules_are_refused_in_one_line():
    classifier, diffusion, x, y = _tiny_problem(n=1)
    defense = build_defense("diffpure", classifier, diffusion, {"t_star": 0.004})
    for model in (attack_model(defense, "bpda"), classifier):
        with pytest.raises(UserError, match="use gradient 'full' or 'surrogate:K', not 'bpda'"):
            DiffHammer(steps=1, purifications=1).perturb(model, x, y)
    assert isinstance(attack_model(defense, "bpda"), BPDA)
    with pytest.raises(UserError, match="not 'bpda'"):
        DiffHammer().check_target("bpda", defense)
    DiffHammer().check_target("surrogate:2", defense)
    DiffHammer().check_target("full", defense)


def test_surrogate_gradients_are_accepted():
    classifier, diffusion, x, y = _tiny_problem(n=2)
    defense = build_defense("hetpure", classifier, diffusion, {"t_l": 40, "t_s": 20, "stride": 10})
    target = attack_model(defense, "surrogate:2")
    target.reseed([3, 4])
    x_adv, history = DiffHammer(steps=2, purifications=2, losses="margin").perturb_with_history(target, x, y)
    assert (perturbation_size(x_adv - x, "Linf") <= 8 / 255 + 1e-7).all() and history.replay_deviation <= 1e-6


def test_registry_builds_diffhammer_and_names_it():
    attacks = build_attacks({"name": "diffhammer", "losses": "margin,ce", "steps": 5, "purifications": 4}, "L2", 0.5, 3)
    assert attacks == [DiffHammer(norm="L2", eps=0.5, losses=("margin", "ce"), steps=5, purifications=4, seed=3)]
    assert attack_label(attacks, None) == "DiffHammer(L2, margin/ce, 5 iter, N 4)"
    assert DiffHammer().name == "DiffHammer(Linf, margin/ce/dlr, 50 iter, N 10)"
    assert DiffHammer(losses=["ce"]).losses == ("ce",)
    assert DiffHammer(restart_threshold=0.3).name == "DiffHammer(Linf, margin/ce/dlr, 50 iter, N 10, restart if avg <= 0.3)"


@pytest.mark.parametrize("settings", [
    {"losses": "margin,cw"}, {"losses": []}, {"purifications": 0}, {"restart_threshold": 2}, {"steps": -1}, {"eot": 3},
])
def test_bad_settings_are_one_line_user_errors(settings):
    with pytest.raises(UserError):
        build_attacks({"name": "diffhammer", **settings}, "Linf", 0.03, 0)


def test_cost_counts_one_purifier_backprop_per_step_and_n_forwards_per_iterate():
    attack = DiffHammer(steps=50, purifications=10)
    assert gradient_evaluations(attack) == 3 * 50
    assert forward_queries(attack) == 10 * (1 + 3 * 51)
