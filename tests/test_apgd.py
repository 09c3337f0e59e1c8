import math

import pytest
import torch
import torch.nn.functional as F
from linear_models import LinearClassifier, linear_problem, linf_breakable
from torch import nn

from hetpure_bench.attacks import attack_label, build_attacks
from hetpure_bench.attacks.apgd import APGDEOT, StepSizeSchedule, should_halve, step_size_checkpoints
from hetpure_bench.attacks.convergence import AttackHistory, converged
from hetpure_bench.attacks.losses import LOSSES, loss_function
from hetpure_bench.attacks.threat import perturbation_size, project, uniform_in_ball
from hetpure_bench.errors import UserError

# ---------------------------------------------------------------- losses


def test_losses_on_hand_computed_logits():
    z = torch.tensor([[1.0, 3.0, 2.0, 0.0], [5.0, 1.0, 0.0, 2.0], [0.0, 4.0, 3.0, 2.0]])
    y = torch.tensor([0, 0, 3])
    ce = torch.tensor([math.log(math.e + math.e ** 3 + math.e ** 2 + 1) - 1,
                       math.log(math.e ** 5 + math.e + 1 + math.e ** 2) - 5,
                       math.log(1 + math.e ** 4 + math.e ** 3 + math.e ** 2) - 2])
    torch.testing.assert_close(LOSSES["ce"](z, y), ce)
    torch.testing.assert_close(LOSSES["margin"](z, y), torch.tensor([3 - 1.0, 2 - 5.0, 4 - 2.0]))
    # dlr: margin / (z_pi1 - z_pi3): (3-1)/(3-1), (2-5)/(5-1), (4-2)/(4-2)
    torch.testing.assert_close(LOSSES["dlr"](z, y), torch.tensor([1.0, -0.75, 1.0]))


def test_loss_names_and_dlr_class_count_are_checked():
    assert loss_function("margin") is LOSSES["margin"]
    with pytest.raises(UserError, match="choose ce, margin, dlr"):
        loss_function("cw")
    with pytest.raises(UserError, match="3 classes"):
        LOSSES["dlr"](torch.zeros(1, 2), torch.zeros(1, dtype=torch.long))


# ---------------------------------------------------------------- closed-form optima


def _binary_problem():
    """Two-class linear model (class 0 for every image): the attack's best move is along -w_diff.
    In float64: near the L2 optimum the loss changes with the square of the angle, below float32's
    resolution, which would make the best iterate a coin toss among nearly optimal ones."""
    g = torch.Generator().manual_seed(0)
    weight = torch.randn(2, 48, generator=g, dtype=torch.float64)
    x = 0.3 + 0.4 * torch.rand(3, 3, 4, 4, generator=g, dtype=torch.float64)  # away from the box edges
    model = LinearClassifier(weight, torch.tensor([2.0, 0.0], dtype=torch.float64)).eval()
    return model, x, torch.zeros(3, dtype=torch.long), (weight[0] - weight[1]).view(1, 3, 4, 4)


@pytest.mark.parametrize("loss", ["ce", "margin"])
def test_linf_apgd_reaches_the_closed_form_optimum(loss):
    model, x, y, w_diff = _binary_problem()
    eps = 0.05
    x_adv = APGDEOT(eps=eps, loss=loss, steps=20, eot=1).perturb(model, x, y)
    torch.testing.assert_close(x_adv, x - eps * w_diff.sign().expand_as(x))


@pytest.mark.parametrize("loss", ["ce", "margin"])
def test_l2_apgd_reaches_the_closed_form_optimum(loss):
    model, x, y, w_diff = _binary_problem()
    eps = 0.3
    x_adv = APGDEOT(norm="L2", eps=eps, loss=loss, steps=50, eot=1).perturb(model, x, y)
    torch.testing.assert_close(x_adv, x - eps * (w_diff / w_diff.norm()).expand_as(x), atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("loss", ["margin", "dlr"])
def test_apgd_finds_every_breakable_image_of_a_multiclass_linear_model(loss):
    model, x, y = linear_problem(n=16)
    eps = 0.03
    breakable = linf_breakable(model, x, y, eps)
    assert 0 < breakable.sum() < len(y)
    x_adv = APGDEOT(eps=eps, loss=loss, steps=50, eot=1).perturb(model, x, y)
    with torch.no_grad():
        assert (model(x_adv).argmax(1) == y).tolist() == (~breakable).tolist()


@pytest.mark.parametrize("norm, eps, net_seed", [("Linf", 0.2, 0), ("L2", 1.0, 3)])
def test_one_restart_equals_pyautoattack_from_the_same_start(norm, eps, net_seed):
    """An independent implementation: pyautoattack's single run from our start point gives the
    same best iterate (deterministic model, EOT 1, ce, whose first step raises the loss here, so
    the original's first-interval slip, see apgd.py, changes nothing). Both projections round
    differently in the last bit, which can flip near-ties of the loss in long runs: 50 steps,
    and cases where the images' step-size schedules differ."""
    from pyautoattack.autopgd_base import APGDAttack

    torch.manual_seed(net_seed)
    net = nn.Sequential(nn.Flatten(), nn.Linear(48, 32), nn.Tanh(), nn.Linear(32, 10)).double()
    x = torch.rand(8, 3, 4, 4, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    with torch.no_grad():
        y = net(x).argmax(1)
    ours = APGDEOT(norm=norm, eps=eps, loss="ce", steps=50, eot=1, seed=3)
    x_adv, history = ours.perturb_with_history(net, x, y)
    start = project(x + uniform_in_ball(x, norm, eps, torch.Generator().manual_seed(3)), x, norm, eps)
    library = APGDAttack(net, n_iter=50, norm=norm, eps=eps, loss="ce", device="cpu")
    library.init_hyperparam(x)
    x_best, _, loss_best, _ = library.attack_single_run(x, y, x_init=start)
    assert len(set(history.step_size[-1].tolist())) > 1  # the images' schedules differ
    torch.testing.assert_close(x_adv, x_best, atol=1e-8, rtol=0)
    torch.testing.assert_close(history.best_loss[-1], loss_best)


# ---------------------------------------------------------------- step-size schedule


def test_step_size_checkpoints_follow_the_original_rounding():
    assert step_size_checkpoints(100) == [22, 41, 57, 70, 80, 87, 93, 99]
    assert [c / 100 for c in step_size_checkpoints(100)][:7] == [0.22, 0.41, 0.57, 0.70, 0.80, 0.87, 0.93]
    assert step_size_checkpoints(50) == [11, 21, 30, 38, 45]  # whole iterations: 11, then -1 down to 3
    assert step_size_checkpoints(10) == [2, 3, 4, 5, 6, 7, 8, 9]
    assert step_size_checkpoints(1) == [] and step_size_checkpoints(0) == []


def test_should_halve_on_either_condition():
    increases = torch.tensor([16.0, 17.0, 12.0, 20.0, 20.0])
    interval = torch.tensor([22, 22, 16, 22, 22])
    reduced_last = torch.tensor([True, True, True, False, True])
    best = torch.tensor([1.0, 1.0, 1.0, 1.0, 1.0])
    best_last = torch.tensor([0.0, 0.0, 0.0, 1.0, 1.0])
    halve = [bool(should_halve(increases[i], int(interval[i]), 0.75, reduced_last[i], best[i], best_last[i]))
             for i in range(5)]
    # 16 <= 16.5; 17 > 16.5; 12 <= 12 (the original's <=); stalled after no reduction; stalled but reduced
    assert halve == [True, False, True, True, False]



def test_the_schedule_halves_and_goes_back_to_the_best_iterate_on_a_scripted_case():
    """StepSizeSchedule alone, checkpoints after passes 2, 4, 6, two images (worked out by hand):
    image a rises, falls once before 4 (1 of 2 increases: halve, back to pass 3), then rises
    below its best (reduced at 4: no halving at 6); image b falls once before 2 (halve, back to
    pass 1), rises twice below its best (reduced at 2: none at 4), then stalls (not reduced at 4
    and no new best: halve at 6, back to pass 1)."""
    losses = torch.tensor([[0.0, 0.0], [1, 1], [2, 0.5], [3, 0.8], [2.5, 0.9], [2.6, 0.95], [2.7, 0.99]], dtype=torch.float64)
    iterate = lambda k: torch.full((2, 1), float(k), dtype=torch.float64)  # noqa: E731  pass k's iterate, its gradient -k
    schedule = StepSizeSchedule(torch.full((2,), 0.2, dtype=torch.float64), frozenset({2, 4, 6}), 0.75, (iterate(0), losses[0], -iterate(0)))
    steps, returned = [], []
    for k in range(len(losses)):
        if k > 0:
            schedule.observe(iterate(k), losses[k], -iterate(k), losses[k - 1])
        x_adv, grad = schedule.checkpoint(k, iterate(k), -iterate(k))
        assert torch.equal(grad, -x_adv)  # the iterate's own gradient goes back with it
        steps.append(schedule.step_size.tolist())
        returned.append(x_adv[:, 0].tolist())
    assert steps == [[0.2, 0.2]] * 2 + [[0.2, 0.1]] * 2 + [[0.1, 0.1]] * 2 + [[0.1, 0.05]]
    assert returned == [[0, 0], [1, 1], [2, 1], [3, 3], [3, 4], [5, 5], [6, 1]]
    start = StepSizeSchedule.start(iterate(0), losses[0], -iterate(0), eps=0.1, steps=100, rho=0.75)
    assert sorted(start.checkpoints) == step_size_checkpoints(100) and start.step_size.tolist() == [0.2, 0.2]

STEPS = 100


def _scripts() -> torch.Tensor:
    """Margin loss per model call t = 0..100 (t = 0 the start point) for five images, and the
    checkpoints at which each must halve its step (worked out by hand below)."""
    t = torch.arange(STEPS + 1, dtype=torch.float64)
    a = t  # rises at every step: never halves
    b = torch.zeros_like(t)  # flat: no increase, halves at every checkpoint
    c = torch.where(t <= 30, t, 60 - t)  # rises to 30, then falls: 8 of 19 increases at 41, 0 later
    # rises to 22, drops, then rises forever below 22: "not reduced last time and no new best"
    # halves at 41, 70, 87, 99 (never twice in a row, the increases count is high throughout)
    d = torch.where(t <= 22, t, t - 123)
    # rises to 41, 4 falls, 12 rises to a new best: 12 increases of 16 at 57 (<= 0.75 x 16)
    e = torch.where(t <= 41, t, torch.where(t <= 45, 41 - 0.5 * (t - 41), 39 + (t - 45)))
    # 17 rises, 5 falls, then rises: 17 of 22 increases at 22 counting the first step against the
    # start point (the original compares it with 0, sees 16 and would halve)
    f = torch.where(t <= 17, t, torch.where(t <= 22, 34 - t, t - 10))
    return torch.stack([a, b, c, d, e, f], 1) - 30.5  # negative: still correctly classified


HALVINGS = [[], [22, 41, 57, 70, 80, 87, 93, 99], [41, 57, 70, 80, 87, 93, 99], [41, 70, 87, 99], [57], []]
IMAGES = len(HALVINGS)


class Scripted(nn.Module):
    """Two-class logits whose margin loss at call t is exactly ``scripts[t]`` per image, with input
    gradient ``directions[t]`` (a straight-through term adds the gradient, not a value)."""

    def __init__(self, scripts, directions):
        super().__init__()
        self.scripts, self.directions, self.inputs = scripts, directions, []

    def forward(self, x):
        t = len(self.inputs)
        self.inputs.append(x.detach().clone())
        linear = (x * self.directions[t]).flatten(1).sum(1)
        value = self.scripts[t] + (linear - linear.detach())  # exactly the script
        return torch.stack([torch.zeros_like(value), value], 1)


def _scripted_run(eps=0.1):
    scripts = _scripts()
    g = torch.Generator().manual_seed(0)
    directions = torch.randn(STEPS + 1, IMAGES, 3, 2, 2, generator=g, dtype=torch.float64)
    x = 0.3 + 0.4 * torch.rand(IMAGES, 3, 2, 2, generator=g, dtype=torch.float64)
    model = Scripted(scripts, directions)
    y = torch.zeros(IMAGES, dtype=torch.long)
    x_adv, history = APGDEOT(eps=eps, steps=STEPS, eot=1).perturb_with_history(model, x, y)
    return scripts, directions, x, model.inputs, x_adv, history


def _linf_project(v, x, eps):
    return torch.min(torch.max(v, x - eps), x + eps).clamp(0, 1)


def test_step_sizes_follow_the_scripted_checkpoint_decisions():
    scripts, _, _, _, _, history = _scripted_run(eps=0.1)
    assert history.step_size.shape == (STEPS + 1, IMAGES)
    for image, halvings in enumerate(HALVINGS):
        expected = [0.2 * 0.5 ** sum(c <= r for c in halvings) for r in range(STEPS + 1)]
        torch.testing.assert_close(history.step_size[:, image], torch.tensor(expected, dtype=torch.float64))
    torch.testing.assert_close(history.best_loss, torch.cummax(scripts, 0).values)
    assert torch.equal(history.robust, torch.cummax(scripts, 0).values < 0)


def test_steps_use_momentum_after_the_first_and_restart_from_the_best_iterate():
    """A plain re-implementation of three steps from the recorded iterates: the first step has no
    momentum; later ones mix 0.75 of the step with 0.25 of the last move; image 3 halves at 41
    and steps on from its best iterate (call 22) with that iterate's gradient."""
    eps = 0.1
    _, directions, x, inputs, _, _ = _scripted_run(eps)
    x0, x1 = inputs[0], inputs[1]
    torch.testing.assert_close(x1, _linf_project(x0 + 2 * eps * directions[0].sign(), x, eps))
    z = _linf_project(x1 + 2 * eps * directions[1].sign(), x, eps)
    torch.testing.assert_close(inputs[2], _linf_project(x1 + 0.75 * (z - x1) + 0.25 * (x1 - x0), x, eps))
    best, before = inputs[22][3], inputs[40][3]
    z = _linf_project(best + eps * directions[22][3].sign(), x[3], eps)
    torch.testing.assert_close(inputs[42][3], _linf_project(best + 0.75 * (z - best) + 0.25 * (best - before), x[3], eps))
    assert not torch.equal(inputs[41][3], best)  # so the restart is visible


def test_the_best_iterate_is_returned_not_the_last():
    scripts, _, _, inputs, x_adv, _ = _scripted_run()
    for image in range(IMAGES):
        first_best = int(torch.argmax(scripts[:, image]))  # first maximum: ties keep the earlier
        assert torch.equal(x_adv[image], inputs[first_best][image]), image
    assert [int(torch.argmax(scripts[:, i])) for i in range(IMAGES)] == [100, 0, 30, 22, 100, 100]


# ---------------------------------------------------------------- EOT, restarts, randomness


class NoisyLinear(nn.Module):
    """A linear model plus Gaussian noise from its own generator; records calls and logits."""

    def __init__(self, model):
        super().__init__()
        self.model, self.generator, self.calls = model, torch.Generator().manual_seed(7), []

    def forward(self, x):
        logits = self.model(x) + 3 * torch.randn(x.shape[0], 10, generator=self.generator)
        self.calls.append(logits.detach())
        return logits


def test_eot_copies_run_as_one_batched_pass_and_their_loss_is_averaged():
    model, x, y = linear_problem(n=4)
    noisy = NoisyLinear(model)
    eot, steps, restarts = 5, 3, 2
    _, history = APGDEOT(eps=0.03, steps=steps, eot=eot, restarts=restarts).perturb_with_history(noisy, x, y)
    assert [len(c) for c in noisy.calls] == [eot * len(y)] * (restarts * (steps + 1))
    first = noisy.calls[0]  # the start point is the best iterate at record 0
    margins = (first.masked_fill(F.one_hot(y.repeat(eot), 10).bool(), -math.inf).amax(1)
               - first.gather(1, y.repeat(eot)[:, None])[:, 0]).view(eot, -1)
    torch.testing.assert_close(history.best_loss[0], margins.mean(0))
    correct = (first.argmax(1) == y.repeat(eot)).view(eot, -1).float().mean(0)
    assert torch.equal(history.robust[0], correct > 0.5)
    assert history.robust.shape == (restarts * (steps + 1), len(y))
    assert (history.best_loss[1:] >= history.best_loss[:-1]).all()  # the best over the restarts too


def test_the_own_check_needs_more_than_half_the_copies_correct():
    class HalfWrong(nn.Module):
        """Copy 0 of every image classified correctly (class 0), copy 1 not."""

        def forward(self, x):
            first = torch.arange(len(x)) < len(x) // 2
            score = x.flatten(1).sum(1)
            return torch.stack([torch.where(first, score, -score), torch.where(first, -score, score)], 1)

    x = torch.rand(3, 1, 2, 2) + 0.1
    _, history = APGDEOT(eps=0.01, steps=1, eot=2).perturb_with_history(HalfWrong(), x, torch.zeros(3, dtype=torch.long))
    assert not history.robust.any()  # one of two copies is no majority


def test_restarts_start_anew_and_the_best_over_all_restarts_is_kept():
    model, x, y = linear_problem(n=4)
    inputs = []

    class Spy(nn.Module):
        def forward(self, z):
            inputs.append(z.detach())
            return model(z)

    attack = APGDEOT(eps=0.03, loss="ce", steps=4, eot=1, restarts=3)
    x_adv, history = attack.perturb_with_history(Spy(), x, y)
    starts = [inputs[r * 5] for r in range(3)]
    assert not torch.equal(starts[0], starts[1]) and not torch.equal(starts[1], starts[2])
    losses = torch.stack([F.cross_entropy(model(z), y, reduction="none") for z in inputs])
    torch.testing.assert_close(history.best_loss[-1], losses.max(0).values)
    for image in range(len(y)):
        assert torch.equal(x_adv[image], inputs[int(losses[:, image].argmax())][image])
    torch.testing.assert_close(history.step_size[5], torch.full((4,), 0.06))  # each restart from 2 eps


@pytest.mark.parametrize("norm, eps", [("Linf", 0.1), ("L2", 1.0)])
def test_results_stay_in_the_ball_and_the_box(norm, eps):
    model, x, y = linear_problem(n=8)
    x = x.clone()
    x[:4] = (x[:4] > 0.5).to(x.dtype)  # images at the box edges
    x_adv = APGDEOT(norm=norm, eps=eps, loss="ce", steps=10, eot=2, restarts=2).perturb(model, x, y)
    assert (perturbation_size(x_adv - x, norm) <= eps * (1 + 1e-6)).all()
    assert x_adv.min() >= 0 and x_adv.max() <= 1
    assert (perturbation_size(x_adv - x, norm) > 0).all()


def test_uniform_in_ball_fills_the_ball():
    g = torch.Generator().manual_seed(0)
    x = torch.zeros(2000, 1, 1, 3)  # d = 3: the radius law eps U^(1/3) is visible
    linf = uniform_in_ball(x, "Linf", 0.5, g)
    assert linf.abs().max() <= 0.5 and abs(linf.abs().mean().item() - 0.25) < 0.01
    radius = uniform_in_ball(x, "L2", 2.0, g).flatten(1).norm(dim=1)
    assert radius.max() <= 2.0 + 1e-6
    assert abs((radius <= 1.0).float().mean().item() - 1 / 8) < 0.03  # volume of half the radius


def test_the_seed_decides_the_result_and_the_global_rng_is_untouched():
    model, x, y = linear_problem(n=4)
    results = []
    for global_seed in (1, 2):
        torch.manual_seed(global_seed)
        state = torch.get_rng_state()
        results.append(APGDEOT(eps=0.03, steps=3, eot=1, seed=5).perturb(model, x, y))
        assert torch.equal(torch.get_rng_state(), state)
    assert torch.equal(results[0], results[1])
    assert not torch.equal(results[0], APGDEOT(eps=0.03, steps=3, eot=1, seed=6).perturb(model, x, y))


def test_eps_zero_is_the_identity():
    model, x, y = linear_problem(n=4)
    assert torch.equal(APGDEOT(eps=0.0, steps=3, eot=1).perturb(model, x, y), x)
    assert torch.equal(APGDEOT(norm="L2", eps=0.0, steps=3, eot=1).perturb(model, x, y), x)


# ---------------------------------------------------------------- registry and names


def test_registry_builds_apgd_and_names_it():
    attacks = build_attacks({"name": "apgd-eot", "loss": "dlr", "steps": 5, "restarts": 2}, "L2", 0.5, 3)
    assert attacks == [APGDEOT(norm="L2", eps=0.5, loss="dlr", steps=5, restarts=2, seed=3)]
    assert attack_label(attacks, None) == "APGD-EOT(L2, dlr, 5 iter, EOT 20, 2 restarts)"
    assert APGDEOT().name == "APGD-EOT(Linf, margin, 100 iter, EOT 20, 1 restart)"
    assert APGDEOT(rho=0.5).name == "APGD-EOT(Linf, margin, 100 iter, EOT 20, 1 restart, rho 0.5)"


@pytest.mark.parametrize("settings", [{"loss": "cw"}, {"eot": 0}, {"restarts": 0}, {"rho": 2}, {"step_size": 0.1}])
def test_bad_settings_are_one_line_user_errors(settings):
    with pytest.raises(UserError):
        build_attacks({"name": "apgd-eot", **settings}, "Linf", 0.03, 0)


# ---------------------------------------------------------------- convergence


def test_converged_on_constructed_histories():
    assert converged([10, 8, 5, 5, 5], 10)  # the last quarter (records 3..4) is flat
    assert converged([10, 9, 8, 7, 6, 6, 6, 6, 5], 10)  # one image over records 6..8
    assert not converged([10, 9, 8, 7, 6, 5, 4, 3, 2], 10)  # still falling: 4, 3, 2
    assert not converged([5, 5, 5, 5, 5, 5, 5, 4, 6], 10)  # not monotone, moved by two
    assert converged([7], 10)
    with pytest.raises(ValueError):
        converged([], 10)
    with pytest.raises(ValueError):
        converged([11, 3], 10)


def test_history_counts_feed_converged():
    robust = torch.tensor([[True, True, True], [True, False, True], [True, False, True], [False, False, True]])
    history = AttackHistory(robust=robust, best_loss=torch.zeros(4, 3), step_size=torch.ones(4, 3))
    assert history.robust_counts() == [3, 2, 2, 1]
    assert converged(history.robust_counts(), 3)
