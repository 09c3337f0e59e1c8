"""Each sanity check passes on an honest setup and fails on a defense built to fool it."""

import torch
from linear_models import FixedDefense, linear_problem

from hetpure_bench.attacks.pgd_eot import PGDEOT
from hetpure_bench.bench.batches import attack_and_evaluate
from hetpure_bench.bench.runner import sanity_checks
from hetpure_bench.bench.sanity import summarise
from hetpure_bench.bench.spec import RunSpec
from hetpure_bench.defenses.base import NoDefense

EPS = 0.04


def _checks(defense, classifier, x, y, attack, **sanity):
    spec = RunSpec(defense="test", eps=attack.eps, batch_size=len(y), sanity={"images": len(y), **sanity})
    index = torch.arange(len(y))
    frames = {"single": attack_and_evaluate(defense, defense, [attack], x, y, index, spec, progress=False)}
    results = sanity_checks(defense, defense, [attack], classifier, x, y, index, spec, frames)["single"]
    return {r.name: r for r in results}


def test_an_honest_setup_passes_every_check():
    model, x, y = linear_problem(n=8)
    checks = _checks(NoDefense(model, None), model, x, y, PGDEOT(eps=EPS, step_size=0.01, steps=8, eot=1))
    assert set(checks) == {"eps-zero", "eps-monotone", "steps-monotone", "gradients", "unbounded-defended", "unbounded-undefended"}
    assert all(c.passed for c in checks.values()), summarise(list(checks.values()))
    assert summarise(list(checks.values())) == "ok"


class Quantising(FixedDefense):
    """Rounds inputs to 4 grey levels: zero gradient almost everywhere (shattered gradients)."""

    def purify(self, x01):
        return torch.round(x01 * 3) / 3


def test_zero_gradients_fail_the_gradient_and_unbounded_checks():
    model, x, y = linear_problem(n=8)
    with torch.no_grad():
        y = model(torch.round(x * 3) / 3).argmax(1)  # labels the quantised model gets right
    checks = _checks(Quantising(model, None), model, x, y, PGDEOT(eps=EPS, step_size=0.01, steps=4, eot=1))
    assert not checks["gradients"].passed and "8/8 images with zero gradient" in checks["gradients"].detail
    assert not checks["unbounded-defended"].passed  # PGD cannot move: sign(0) = 0
    assert checks["unbounded-undefended"].passed  # the bare classifier is fine
    assert summarise(list(checks.values())).startswith("FAILED: gradients")


class SnapsBackWhenFar(FixedDefense):
    """Passes the input through near the clean images but maps anything farther than ``radius``
    (Linf) back to its clean image: a bigger budget or more iterations make the attack fail."""

    def __init__(self, classifier, clean, radius):
        super().__init__(classifier, None)
        self.clean, self.radius = clean, radius

    def purify(self, x01):
        far = (x01 - self.clean).flatten(1).abs().amax(1) > self.radius
        return torch.where(far.view(-1, 1, 1, 1), self.clean, x01)


def test_a_budget_dependent_defense_fails_both_monotonicity_checks():
    model, _, _ = linear_problem(classes=2)
    d = model.weight[0] - model.weight[1]
    model.bias.data = -0.5 * model.weight.sum(1)  # the all-0.5 image lies on the boundary
    # Class-0 images at Linf distance 0.005..0.015 from the boundary: all breakable within
    # eps/2 = 0.02; 4 steps of 0.01 reach 0.04 > radius 0.03, where the defense snaps back.
    x = 0.5 + torch.linspace(0.005, 0.015, 4).view(-1, 1, 1, 1) * d.sign().view(1, 3, 4, 4)
    y = torch.zeros(4, dtype=torch.long)
    defense = SnapsBackWhenFar(model, x, radius=0.03)
    checks = _checks(defense, model, x, y, PGDEOT(eps=EPS, step_size=0.01, steps=4, eot=1), tolerance=0)
    assert not checks["eps-monotone"].passed, checks["eps-monotone"].detail
    assert not checks["steps-monotone"].passed, checks["steps-monotone"].detail
    assert checks["eps-zero"].passed


class GlobalNoise(FixedDefense):
    """Randomised with the global RNG instead of its own generator: clean and eps = 0
    evaluations see different noise, and the attack sees yet another."""

    def forward(self, x01):
        return self.classifier(x01) + 30 * torch.randn(x01.shape[0], 2)

    def purify(self, x01):
        return x01


def test_uncontrolled_randomness_fails_the_eps_zero_check():
    torch.manual_seed(0)
    model, x, y = linear_problem(n=16, classes=2)
    checks = _checks(GlobalNoise(model, None), model, x, y, PGDEOT(eps=EPS, step_size=0.01, steps=2, eot=1))
    assert not checks["eps-zero"].passed, checks["eps-zero"].detail


class QuantisedInput(torch.nn.Module):
    """A classifier that rounds its input: its own gradient is zero (masked at the source)."""

    def __init__(self, classifier):
        super().__init__()
        self.classifier = classifier

    def forward(self, x):
        return self.classifier(torch.round(x * 3) / 3)


def test_a_gradient_masking_classifier_fails_the_undefended_unbounded_check():
    model, x, _ = linear_problem(n=8)
    masked = QuantisedInput(model)
    with torch.no_grad():
        y = masked(x).argmax(1)
    checks = _checks(NoDefense(masked, None), masked, x, y, PGDEOT(eps=EPS, step_size=0.01, steps=4, eot=1))
    assert not checks["unbounded-undefended"].passed, checks["unbounded-undefended"].detail
    assert "8/8 robust" in checks["unbounded-undefended"].detail


def _fractional_checks(robust_by_budget, zero_robust=None, tolerance=1):
    """The checks on 4 images with expected:K-style fractional outcomes, from an ``evaluate``
    that returns scripted frames per attack budget (eps/2, steps/2, full, unbounded)."""
    import pandas as pd

    from hetpure_bench.bench.sanity import SanityConfig, run_sanity_checks

    model, x, y = linear_problem(n=4)
    clean = [0.5, 1.0, 0.25, 1.0]
    attack = PGDEOT(eps=EPS, step_size=0.01, steps=4, eot=1)

    def frame(robust):
        return pd.DataFrame({"clean_pred": y.tolist(), "adv_pred": y.tolist(), "clean_correct": clean, "robust_correct": robust})

    def evaluate(attacks, defense=None, target=None):
        a = attacks[0]
        if a.eps == 0:
            return frame(zero_robust or clean)
        if a.eps > 0.5:
            return frame([0.0] * 4)  # unbounded
        return frame(robust_by_budget["eps/2" if a.eps < EPS else "steps/2" if a.steps < 4 else "full"])

    checks = run_sanity_checks(evaluate, frame(robust_by_budget["full"]), [attack], model, model, x, y, "Linf",
                               SanityConfig(images=4, tolerance=tolerance))
    return {c.name: c for c in checks}


def test_monotonicity_with_fractional_outcomes_allows_tolerance_over_n_in_the_mean():
    # Sums: eps/2 1.3, steps/2 1.5, full 2.4: 2.4 > 1.3 + 1 (fails), 2.4 <= 1.5 + 1 (passes).
    budgets = {"eps/2": [0.3, 0.5, 0.25, 0.25], "steps/2": [0.5, 0.5, 0.25, 0.25], "full": [0.4, 1.0, 0.25, 0.75]}
    checks = _fractional_checks(budgets)
    assert not checks["eps-monotone"].passed
    assert checks["eps-monotone"].detail == "robust 1.3/4 at eps/2, 2.4/4 at eps (tolerance 1)"
    assert checks["steps-monotone"].passed and checks["eps-zero"].passed and checks["unbounded-defended"].passed
    assert _fractional_checks(budgets, tolerance=2)["eps-monotone"].passed


def test_eps_zero_with_fractional_outcomes_compares_each_image_over_every_pass():
    budgets = {"eps/2": [0.5] * 4, "steps/2": [0.5] * 4, "full": [0.5] * 4}
    # Same first-pass predictions, but image 0 right in fewer adversarial passes than clean ones.
    check = _fractional_checks(budgets, zero_robust=[0.25, 1.0, 0.25, 1.0])["eps-zero"]
    assert not check.passed and "1/4 predictions differ" in check.detail and "robust 2.5/4 vs clean 2.75/4" in check.detail


def test_an_honest_setup_passes_every_check_under_expected_outcomes():
    model, x, y = linear_problem(n=8)
    defense, attack = NoDefense(model, None), PGDEOT(eps=EPS, step_size=0.01, steps=8, eot=1)
    spec = RunSpec(defense="test", eps=EPS, batch_size=8, evaluation="expected:2", sanity={"images": 8})
    index = torch.arange(8)
    frames = {"expected:2": attack_and_evaluate(defense, defense, [attack], x, y, index, spec, progress=False)}
    checks = sanity_checks(defense, defense, [attack], model, x, y, index, spec, frames)["expected:2"]
    assert frames["expected:2"]["robust_correct"].dtype == float
    assert all(c.passed for c in checks), summarise(checks)


def test_each_check_is_announced_before_it_runs_in_the_order_check_names_gives():
    """The progress bar's names: ``started(name)`` comes before that check's own evaluation."""
    import pandas as pd

    from hetpure_bench.bench.sanity import SanityConfig, check_names, run_sanity_checks

    model, x, y = linear_problem(n=4)
    for steps, expected in ((4, 6), (1, 5)):  # one step cannot be halved: no steps-monotone
        attack = PGDEOT(eps=EPS, step_size=0.01, steps=steps, eot=1)
        events = []

        def evaluate(attacks, defense=None, target=None):
            a = attacks[0]
            budget = ("eps-zero" if a.eps == 0 else "unbounded-defended" if a.eps > 0.5 and defense is None
                      else "unbounded-undefended" if a.eps > 0.5 else "eps-monotone" if a.eps < EPS else "steps-monotone")
            events.append(("evaluate", budget))
            return pd.DataFrame({"clean_pred": y.tolist(), "adv_pred": y.tolist(), "clean_correct": [1.0] * 4,
                                 "robust_correct": [0.0] * 4 if a.eps > 0.5 else [1.0] * 4})

        full = evaluate([attack])
        events.clear()
        results = run_sanity_checks(evaluate, full, [attack], model, model, x, y, "Linf", SanityConfig(images=4),
                                    lambda name: events.append(("started", name)))
        names = check_names([attack])
        assert len(names) == expected and [r.name for r in results] == names
        assert [name for kind, name in events if kind == "started"] == names
        for kind, name in events:  # each evaluation belongs to the check announced last
            if kind == "evaluate":
                assert name == [n for k, n in events[:events.index((kind, name))] if k == "started"][-1]
