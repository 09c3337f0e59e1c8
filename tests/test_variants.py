import pytest
import torch
from test_defenses import CountingModel, _x
from tiny_models import tiny_models

from hetpure_bench.defenses import DEFENSES, HETPURE_VARIANTS, build_defense
from hetpure_bench.diffusion.resampling import denoising_steps, jump_schedule

SMALL = {"t_l": 40, "t_s": 20, "stride": 10, "resample_steps": 2}


def test_jump_schedule_hand_checked():
    assert jump_schedule(3, 1, 0) == [0, 1, 2, 3]
    assert jump_schedule(3, 1, 1) == [0, 1, 0, 1, 2, 1, 2, 3]
    assert jump_schedule(5, 2, 1) == [0, 1, 2, 1, 0, 1, 2, 3, 4, 3, 2, 3, 4, 5]
    only_first = jump_schedule(3, 1, 1, may_jump=lambda p: p == 1)
    assert only_first == [0, 1, 0, 1, 2, 3]


@pytest.mark.parametrize("n, length, jumps", [(3, 1, 1), (10, 1, 20), (10, 2, 3), (7, 3, 2), (5, 1, 0)])
def test_denoising_steps_closed_form(n, length, jumps):
    schedule = jump_schedule(n, length, jumps)
    downs = sum(1 for a, b in zip(schedule, schedule[1:]) if b == a + 1)
    assert downs == denoising_steps(n, length, jumps)
    assert schedule[-1] == n and all(abs(b - a) == 1 for a, b in zip(schedule, schedule[1:]))


@pytest.mark.parametrize("n, length, jumps", [(250, 10, 9), (4, 2, 2), (10, 4, 1), (100, 1, 20), (7, 3, 2)])
def test_jump_schedule_is_repaints(n, length, jumps):
    # RePaint's get_schedule_jump, written here on its own terms (respaced indices n - 1 ... 0,
    # jumps at indices 0, L, 2L, ... < n - L, jump_n_sample - 1 = jumps each), then read as
    # positions (index k is position n - 1 - k, the clean image -1 is position n).
    from test_hetpure_replay import repaint_times

    assert jump_schedule(n, length, jumps) == [n - 1 - k for k in repaint_times(n, length, jumps + 1)]


@pytest.mark.parametrize("stage_rule", ["next", "current"])
@pytest.mark.parametrize("final_step", ["t0", "clean"])
@pytest.mark.parametrize("resampling, jump_length", [("single", 1), ("multi", 1), ("multi", 2), ("none", 1)])
def test_nfe_is_the_real_count_for_every_rule(stage_rule, final_step, resampling, jump_length):
    classifier, diffusion = tiny_models()
    counting = CountingModel(diffusion)
    settings = {"t_l": 50, "t_s": 20, "stride": 10, "resample_steps": 2, "resampling": resampling, "jump_length": jump_length}
    defense = build_defense("hetpure", classifier, counting, {**settings, "stage_rule": stage_rule, "final_step": final_step})
    with torch.no_grad():
        defense.purify(_x())
    assert counting.calls == defense.nfe
    # Grid 50 ... 10 then 0 or clean: 5 calls; jumps at the interior points >= t_s = 20, every
    # L-th counted back from the last call (10), whatever the rule and the final step.
    positions = {1: 3, 2: 1}[jump_length] if resampling == "multi" else 0  # L=1: 40, 30, 20; L=2: 30
    assert defense.nfe == 5 + 2 * jump_length * positions


@pytest.mark.parametrize("name", sorted(HETPURE_VARIANTS) + ["hetpure"])
def test_variant_nfe_is_the_real_count(name):
    classifier, diffusion = tiny_models()
    counting = CountingModel(diffusion)
    overrides = dict(SMALL, t_s=1) if name == "repaint" else SMALL
    defense = build_defense(name, classifier, counting, overrides)
    with torch.no_grad():
        out = defense.purify(_x())
    assert counting.calls == defense.nfe
    assert out.shape == (2, 3, 8, 8)


def test_closed_form_nfe_of_the_paper_settings():
    classifier, diffusion = tiny_models()
    assert build_defense("hetpure", classifier, diffusion).nfe == 100
    # 50 stage-1 positions (grid times 198..100) with 20 re-denoising steps each.
    assert build_defense("hetpure-multistep", classifier, diffusion).nfe == 100 + 20 * 50
    assert build_defense("repaint", classifier, diffusion).nfe == 100 + 20 * 99
    assert build_defense("hetpure-v1", classifier, diffusion).nfe == 40  # stride 5


def test_first_release_and_u10_are_what_they_say():
    v1 = DEFENSES.build("hetpure-v1").config_class()
    assert (v1.stride, v1.mask.tau, v1.resample_steps, v1.t_l, v1.t_s) == (5, 0.85, 10, 200, 100)
    assert (v1.stage_rule, v1.final_step) == ("next", "t0")  # the first release's loop is the same
    u10 = DEFENSES.build("hetpure-u10").config_class()
    assert (u10.stride, u10.mask.tau, u10.resample_steps) == (2, 0.9, 10)
    assert "not a released configuration" in DEFENSES.get("hetpure-u10").info["summary"]


@pytest.mark.parametrize("name, t_s", [("repaint", 1), ("hetpure-multistep", 20)])
def test_multistep_with_u0_equals_no_resampling(name, t_s):
    classifier, diffusion = tiny_models()
    settings = dict(SMALL, t_s=t_s, resample_steps=0)
    a = build_defense(name, classifier, diffusion, settings, seed=4)
    same_sampler = {key: getattr(a.config, key) for key in ("stage_rule", "final_step", "sampler")}
    b = build_defense("hetpure-noresample", classifier, diffusion, {**settings, **same_sampler}, seed=4)
    with torch.no_grad():
        torch.testing.assert_close(a.purify(_x()), b.purify(_x()))


def test_random_mask_has_the_attention_masks_area():
    classifier, diffusion = tiny_models()
    random = build_defense("hetpure-randmask", classifier, diffusion, {"mask.tau": 0.5})
    attention = build_defense("hetpure", classifier, diffusion, {"mask.tau": 0.5})
    x = _x(4)
    m_random, m_attention = random.mask(x), attention.mask(x)
    assert torch.equal(m_random.sum((1, 2, 3)), m_attention.sum((1, 2, 3)))
    assert not torch.equal(m_random, m_attention)


def test_uniform_variants_use_constant_masks():
    classifier, diffusion = tiny_models()
    x = _x()
    assert build_defense("hetpure-uniform-tl", classifier, diffusion).mask(x).eq(1).all()
    assert build_defense("hetpure-uniform-ts", classifier, diffusion).mask(x).eq(0).all()


def test_variants_are_registered_with_their_settings():
    for name, (defaults, _) in HETPURE_VARIANTS.items():
        entry = DEFENSES.get(name)
        for key, value in defaults.items():
            assert f"{key}={value!r}" in entry.info["config"]
