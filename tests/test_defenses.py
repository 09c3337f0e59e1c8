import math

import pytest
import torch
from tiny_models import tiny_models

from hetpure_bench.defenses import DEFENSES, build_defense
from hetpure_bench.defenses.diffpure import DiffPure, DiffPureConfig
from hetpure_bench.defenses.hetpure import HeterogeneousPurifier, HetPureConfig, distinct_prefix
from hetpure_bench.diffusion import sampling
from hetpure_bench.diffusion.noise import randn_like
from hetpure_bench.diffusion.sampling import ddim_sample
from hetpure_bench.diffusion.schedule import VPSchedule, q_forward, q_sample, timestep_grid
from hetpure_bench.errors import UnknownNameError, UserError

S = VPSchedule()


def _x(n=2, seed=0, dtype=torch.float32):
    return torch.rand(n, 3, 8, 8, generator=torch.Generator().manual_seed(seed), dtype=dtype)


class CountingModel(torch.nn.Module):
    def __init__(self, inner):
        super().__init__()
        self.inner, self.calls = inner, 0

    def forward(self, x, t):
        self.calls += 1
        return self.inner(x, t)


def test_registry_has_the_defenses():
    assert {"none", "diffpure", "hetpure"} <= set(DEFENSES.names())
    with pytest.raises(UnknownNameError, match="did you mean 'hetpure'"):
        DEFENSES.get("het-pure")


@pytest.mark.parametrize(
    "name, overrides, expected_nfe",
    [
        ("hetpure", {}, 100), ("hetpure", {"stride": 20}, 10), ("hetpure", {"stride": 100}, 2),
        ("diffpure", {}, 101), ("diffpure", {"sampler": "ddim", "ddim_stride": 10}, 10),
        ("diffpure", {"sampler": "sde"}, 100), ("none", {}, 0),
    ],
)
def test_nfe_is_the_closed_form_and_the_real_count(name, overrides, expected_nfe):
    classifier, diffusion = tiny_models()
    counting = CountingModel(diffusion)
    defense = build_defense(name, classifier, counting, overrides)
    assert defense.nfe == expected_nfe
    with torch.no_grad():
        out = defense.purify(_x())
    assert counting.calls == expected_nfe
    assert out.shape == (2, 3, 8, 8) and out.min() >= 0 and out.max() <= 1


def test_diffpure_l2_default_t_star():
    classifier, diffusion = tiny_models()
    assert build_defense("diffpure", classifier, diffusion, threat="L2").config.t_star == 0.075
    assert build_defense("diffpure", classifier, diffusion, {"t_star": 0.05}, threat="L2").config.t_star == 0.05


def test_overrides_nested_and_bad():
    classifier, diffusion = tiny_models()
    defense = build_defense("hetpure", classifier, diffusion, {"mask.tau": 0.85, "resample_steps": 10})
    assert defense.config.mask.tau == 0.85 and defense.config.resample_steps == 10
    with pytest.raises(UserError, match="no setting 'tl'"):
        build_defense("hetpure", classifier, diffusion, {"tl": 100})
    with pytest.raises(UserError):
        build_defense("hetpure", classifier, diffusion, {"t_s": 300})
    with pytest.raises(UserError):
        build_defense("diffpure", classifier, diffusion, {"sampler": "euler"})


def test_single_forward_draw_matches_u_one_step_transitions():
    # U = 3 one-step transitions t -> t+1 -> t+2 -> t+3 and one q(x_{t+3} | x_t) draw agree in
    # mean and variance (the reference applies the steps one by one).
    g = torch.Generator().manual_seed(0)
    x_t = torch.full((200_000,), 0.4, dtype=torch.float64)
    stepwise = x_t
    for k in range(100, 103):
        stepwise = q_forward(S, stepwise, k, k + 1, g)
    single = q_forward(S, x_t, 100, 103, g)
    assert single.mean().item() == pytest.approx(stepwise.mean().item(), abs=2e-3)
    assert single.var().item() == pytest.approx(stepwise.var().item(), rel=3e-2)
    ratio = (S.alpha_bar(103) / S.alpha_bar(100)).item()
    assert single.mean().item() == pytest.approx(math.sqrt(ratio) * 0.4, abs=2e-3)
    assert single.var().item() == pytest.approx(1 - ratio, rel=3e-2)


def _replay_reference(x01, diffusion, t_start, stride, seed, draws_before, end):
    """DDIM purification from t_start to ``end`` whose start noise is the generator's draw number
    ``draws_before`` (0-based): replays the draws hetpure makes before it."""
    g = torch.Generator().manual_seed(seed)
    x0 = x01 * 2 - 1
    for _ in range(draws_before):
        randn_like(x0, g)
    x = q_sample(S, x0, t_start, g)
    grid = [t for t in timestep_grid(40, stride, end) if t <= t_start]
    with torch.no_grad():
        return ((ddim_sample(diffusion, S, x, grid) + 1) / 2).clamp(0, 1)


@pytest.mark.parametrize(
    "mask_value, rule, t_start, draws_before",
    [
        # All ones: draw 0 is the forward noise to t_l; the blends' draws only touch the empty
        # low-attention region, so this is DDIM from t_l = 40.
        (1.0, {}, 40, 0),
        (1.0, {"stage_rule": "current", "final_step": "clean"}, 40, 0),
        # All zeros, the reference's rule: forward to t_l, then a blend draw before each step to
        # s >= t_s = 20, i.e. at 40 and 30; the last one (draw 2) starts plain DDIM from 30.
        (0.0, {}, 30, 2),
        # The earlier rule: a blend draw at each grid point t >= 20 (40, 30, 20): DDIM from 20.
        (0.0, {"stage_rule": "current", "final_step": "clean"}, 20, 3),
    ],
)
def test_hetpure_with_a_constant_mask_is_ddim_from_t_l_or_t_s(mask_value, rule, t_start, draws_before):
    classifier, diffusion = tiny_models(dtype=torch.float64)
    config = HetPureConfig(t_l=40, t_s=20, stride=10, resample_steps=0, **rule)
    defense = HeterogeneousPurifier(classifier, diffusion, config, seed=3)
    x01 = _x(dtype=torch.float64)
    with torch.no_grad():
        out = defense.purify_with_mask(x01, torch.full((1, 1, 8, 8), mask_value, dtype=torch.float64))
    end = 0 if config.final_step == "t0" else -1
    torch.testing.assert_close(out, _replay_reference(x01, diffusion, t_start, 10, seed=3, draws_before=draws_before, end=end))


def test_hetpure_mask_regions_follow_their_noise_levels():
    # With an oracle-free check: the purified low-attention region stays closer to the input than
    # the high-attention region (weak vs strong noise), on average over images.
    classifier, diffusion = tiny_models()
    defense = HeterogeneousPurifier(classifier, diffusion, HetPureConfig(t_l=600, t_s=50, stride=50), seed=0)
    x01 = _x(8)
    mask = torch.zeros(1, 1, 8, 8)
    mask[..., :4] = 1
    with torch.no_grad():
        out = defense.purify_with_mask(x01, mask)
    change = (out - x01).abs()
    assert change[..., :4].mean() > change[..., 4:].mean()


def test_defense_noise_is_isolated_from_the_global_rng():
    classifier, diffusion = tiny_models()
    a = build_defense("hetpure", classifier, diffusion, {"stride": 50}, seed=5)
    b = build_defense("hetpure", classifier, diffusion, {"stride": 50}, seed=5)
    with torch.no_grad():
        out_a = a.purify(_x())
        torch.manual_seed(999)
        out_b = b.purify(_x())
    torch.testing.assert_close(out_a, out_b)
    b.reseed(6)
    with torch.no_grad():
        assert not torch.equal(out_a, b.purify(_x()))


@pytest.mark.parametrize(
    "name, overrides",
    [("hetpure", {"t_l": 40, "t_s": 20, "stride": 5}), ("diffpure", {"t_star": 0.02}), ("diffpure", {"t_star": 0.02, "sampler": "sde"})],
)
def test_checkpointed_gradients_equal_plain_gradients(name, overrides):
    classifier, diffusion = tiny_models(dtype=torch.float64)
    defense = build_defense(name, classifier, diffusion, overrides, seed=1)
    y = torch.tensor([1, 2])

    def gradient():
        defense.reseed(1)
        x = _x(dtype=torch.float64).requires_grad_(True)
        loss = torch.nn.functional.cross_entropy(defense(x), y)
        return torch.autograd.grad(loss, x)[0]

    def saved_bytes() -> int:  # what autograd keeps for the backward pass of one gradient
        sizes = []
        with torch.autograd.graph.saved_tensors_hooks(lambda t: sizes.append(t.numel() * t.element_size()) or t, lambda t: t):
            gradient()
        return sum(sizes)

    with_checkpointing, checkpointed_bytes = gradient(), saved_bytes()
    with sampling.activation_checkpointing(False):
        without, plain_bytes = gradient(), saved_bytes()
    assert torch.equal(with_checkpointing, without)  # the recomputation is exact
    assert torch.isfinite(with_checkpointing).all() and with_checkpointing.abs().sum() > 0
    assert plain_bytes > checkpointed_bytes  # the switch really keeps the network's activations


def test_surrogates_have_the_asked_for_calls():
    classifier, diffusion = tiny_models()
    assert build_defense("hetpure", classifier, diffusion).surrogate(2).nfe == 2
    surrogate = build_defense("diffpure", classifier, diffusion).surrogate(5)
    assert surrogate.nfe == 5 and surrogate.config.sampler == "ddim"
    with pytest.raises(UserError):
        DiffPure(classifier, None, DiffPureConfig())  # needs a diffusion model


def test_third_party_defenses_register_through_entry_points(monkeypatch):
    from dataclasses import dataclass
    from importlib.metadata import EntryPoint

    import hetpure_bench.defenses as defenses
    from hetpure_bench.defenses.base import Defense

    @dataclass(frozen=True)
    class BlurConfig:
        width: int = 3

    class Blur(Defense):
        name = "test-blur"
        config_class = BlurConfig
        needs_diffusion = False

        def purify(self, x01):
            return torch.nn.functional.avg_pool2d(x01, self.config.width, 1, self.config.width // 2)

        @property
        def nfe(self):
            return 0

    point = EntryPoint("test-blur", "thirdparty:Blur", defenses.ENTRY_POINT_GROUP)
    monkeypatch.setattr(EntryPoint, "load", lambda self: Blur)
    monkeypatch.setattr(defenses, "entry_points", lambda group: [point] if group == defenses.ENTRY_POINT_GROUP else [])
    monkeypatch.setattr(defenses, "DEFENSES", type(defenses.DEFENSES)("defense"))
    defenses.load_entry_point_defenses()
    classifier, _ = tiny_models()
    blur = defenses.build_defense("test-blur", classifier, None, {"width": 5})
    assert blur.config.width == 5 and blur.purify(_x()).shape == (2, 3, 8, 8)
    assert defenses.DEFENSES.get("test-blur").info["source"] == "entry point thirdparty:Blur"


def test_hetpure_computes_the_mask_once_per_call_and_leaves_no_hooks():
    classifier, diffusion = tiny_models()
    calls = []
    classifier.register_forward_pre_hook(lambda module, args: calls.append(1))
    defense = build_defense("hetpure", classifier, diffusion, {"stride": 20})
    with torch.no_grad():
        defense(_x())
    assert len(calls) == 2  # one pass for the mask, one to classify the purified images
    for module in (classifier.layer1, classifier.layer2):
        assert not module._forward_hooks


def test_distinct_prefix_finds_the_repeated_images():
    x = _x(3)
    assert distinct_prefix(x) == 3
    assert distinct_prefix(x.repeat(4, 1, 1, 1)) == 3
    assert distinct_prefix(x[:1].repeat(5, 1, 1, 1)) == 1
    assert distinct_prefix(torch.cat([x, x[:2]])) == 5  # not whole copies


def test_hetpure_computes_the_mask_once_per_distinct_input():
    classifier, diffusion = tiny_models()
    rows = []
    classifier.register_forward_pre_hook(lambda module, args: rows.append(args[0].shape[0]))
    defense = build_defense("hetpure", classifier, diffusion, {"t_l": 40, "t_s": 20, "stride": 10})
    fresh = build_defense("hetpure", classifier, diffusion, {"t_l": 40, "t_s": 20, "stride": 10})
    x, other = _x(2), _x(2, seed=1)
    with torch.no_grad():
        masks = defense.mask(x.repeat(3, 1, 1, 1))  # an EOT batch: the mask of 2 images, repeated
        assert rows == [2] and torch.equal(masks, fresh.mask(x).repeat(3, 1, 1, 1))
        rows.clear()
        defense.reseed(0)
        first = defense(x)
        second = defense(x)  # the same input again (a worst-of-N pass): no new mask pass
        assert rows == [2, 2, 2]  # mask, classify, classify
        assert not torch.equal(first, second)  # the noise still advances between the passes
        rows.clear()
        assert torch.equal(defense.mask(other), fresh.mask(other)) and rows == [2, 2]  # a new input: recomputed
    relaxed = defense.with_mask_gradient(0.1)
    rows.clear()
    x_adv = x.repeat(2, 1, 1, 1).requires_grad_(True)
    relaxed.mask(x_adv).sum().backward()
    assert rows == [4]  # the mask-aware attack differentiates every copy's mask


def test_hooks_are_removed_when_the_classifier_fails_mid_mask():
    classifier, diffusion = tiny_models()

    def explode(module, args, output):
        raise RuntimeError("classifier failed")

    classifier.layer2.register_forward_hook(explode)
    defense = build_defense("hetpure", classifier, diffusion, {"stride": 20})
    with pytest.raises(RuntimeError, match="classifier failed"):
        defense.purify(_x())
    assert not classifier.layer1._forward_hooks
    assert len(classifier.layer2._forward_hooks) == 1  # only the test's own hook is left
