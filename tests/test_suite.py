"""`--attack suite`: one row, the per-image worst case over a set of attacks, its members sized by
the preset, the members that cannot run against a defense skipped and named."""

from dataclasses import dataclass

import pytest
from test_runner import _spec, _tiny_runs

from hetpure_bench.attacks import ATTACKS, DEFAULT_SUITE, attack_label, build_attacks
from hetpure_bench.attacks.apgd import APGDEOT
from hetpure_bench.attacks.pgd_eot import PGDEOT
from hetpure_bench.bench.spec import placeholder_defense, row_attacks, spec_from_preset, validate
from hetpure_bench.bench.statistics import wilson_interval
from hetpure_bench.bench.store import ResultStore
from hetpure_bench.errors import UserError
from hetpure_bench.registry import Entry

MEMBERS = {"apgd-eot": {"steps": 1, "eot": 1}}  # tiny members: one iteration each
APGD_PAIR = [{"name": "apgd-eot", "loss": "margin"}, {"name": "apgd-eot", "loss": "ce"}]


def _build(settings):
    return build_attacks(settings, "Linf", 8 / 255, 0)


def test_the_suite_row_is_the_per_image_worst_case_with_each_members_own_accuracy(tmp_path, monkeypatch):
    from hetpure_bench.bench.runner import run

    _tiny_runs(monkeypatch)
    with ResultStore(tmp_path / "r.sqlite") as store:
        row = run(_spec("none", eps=0.01, evaluation="single", attack={"name": "suite", "members": APGD_PAIR, **MEMBERS}), store,
                  progress=False)[0]
        suite = store.per_image(row["setup_hash"], "single")
        # Each member alone, an independent run with its own setup: the same examples, so the same outcomes.
        alone = {}
        for loss in ("margin", "ce"):
            single = run(_spec("none", eps=0.01, evaluation="single", attack={"name": "apgd-eot", "loss": loss, **MEMBERS["apgd-eot"]}),
                         store, progress=False)[0]
            alone[loss] = (store.per_image(single["setup_hash"], "single"), single)
    margin, ce = alone["margin"][0]["robust_correct"], alone["ce"][0]["robust_correct"]
    assert suite["robust_correct_0"].tolist() == margin.tolist() and suite["robust_correct_1"].tolist() == ce.tolist()
    assert (margin != ce).any()  # the members disagree on some image: the worst case is not one member's
    assert suite["robust_correct"].tolist() == (margin & ce).tolist()
    assert row["robust_acc"] == (margin & ce).mean() < ce.mean()
    assert row["attack"] == ("suite(APGD-EOT(Linf, margin, 1 iter, EOT 1, 1 restart) + "
                             "APGD-EOT(Linf, ce, 1 iter, EOT 1, 1 restart))")
    for k, values in enumerate((margin, ce)):
        low, high = wilson_interval(int(values.sum()), 6)
        part = row["robust_by_attack"].split("; ")[k]
        assert part.startswith(alone[["margin", "ce"][k]][1]["attack"])
        assert part.endswith(f"{100 * values.mean():.1f} [{100 * low:.1f}, {100 * high:.1f}]")
    # Each member's convergence evidence, as the member's own row has it.
    assert row["convergence"] == alone["margin"][1]["convergence"] + alone["ce"][1]["convergence"]


def test_suite_settings_size_members_per_attack_name_and_the_command_line_sizes_every_member():
    from hetpure_bench.attacks.diffattack import DiffAttack

    default = _build({"name": "suite"})
    assert [(type(a), getattr(a, "loss", None), a.steps) for a in default] == [
        (APGDEOT, "margin", 100), (APGDEOT, "ce", 100), (DiffAttack, None, DiffAttack().steps)]
    assert [{"name": "apgd-eot", "loss": a.loss} for a in default[:2]] == list(DEFAULT_SUITE[:2])
    assert DEFAULT_SUITE[2] == {"name": "diffattack"}
    # Per attack name: sizes (a member's own loss wins); any other setting: every member.
    sized = _build({"name": "suite", "apgd-eot": {"steps": 7, "eot": 3, "loss": "dlr"}, "eot": 5})
    assert [(getattr(a, "loss", None), a.steps, a.eot) for a in sized] == [("margin", 7, 5), ("ce", 7, 5), (None, DiffAttack().steps, 5)]
    members = _build({"name": "suite", "members": [{"name": "pgd-eot", "steps": 3}, {"name": "apgd-eot", "loss": "dlr"}],
                      "apgd-eot": {"steps": 4}})
    assert [(type(a), a.steps) for a in members] == [(PGDEOT, 3), (APGDEOT, 4)] and members[1].loss == "dlr"
    # The command line on top of the preset's suite settings.
    spec = spec_from_preset("smoke", "hetpure", attack={"name": "suite", "steps": 3})
    assert spec.attack == {"name": "suite", "apgd-eot": {"steps": 10, "eot": 2}, "diffattack": {"steps": 5, "eot": 2}, "steps": 3}
    assert [(getattr(a, "loss", None), a.steps, a.eot) for a in _build(spec.attack)] == [("margin", 3, 2), ("ce", 3, 2), (None, 3, 2)]


@pytest.mark.parametrize("settings, message", [
    ({"members": []}, "non-empty list"),
    ({"members": [{"loss": "ce"}]}, "with its name"),
    ({"members": [{"name": "suite"}]}, "not 'suite'"),
    ({"members": [{"name": "apgd-eot", "mask_aware": 0.1}]}, "mask_aware applies to a whole suite"),
    ({"apgd-eot": {"step_size": 0.1}}, "bad setting for attack 'apgd-eot'"),
    ({"step_size": 0.1}, "bad setting for attack 'apgd-eot'"),  # PGD's setting given to every member
])
def test_bad_suite_settings_are_one_line_errors(settings, message):
    with pytest.raises(UserError, match=message):
        _build({"name": "suite", **settings})


def test_a_suite_label_wraps_its_members_and_the_others_stay_as_they_were():
    pgd, apgd = _build({"name": "pgd-eot"}) + _build({"name": "apgd-eot"})
    assert attack_label([pgd, apgd], 0.05) == f"{pgd.name} + {apgd.name} + mask-aware(T=0.05)"  # not a suite
    assert attack_label([pgd, apgd], None, suite="suite") == f"suite({pgd.name} + {apgd.name})"
    assert attack_label([apgd], 0.05, "suite", [pgd]) == f"suite({apgd.name}; skipped, not applicable: {pgd.name}) + mask-aware(T=0.05)"


@dataclass(frozen=True)
class NeedsStates(PGDEOT):
    """An attack that, like DiffAttack, cannot run without a purifier's states or with BPDA."""

    @property
    def name(self) -> str:
        return f"NeedsStates({self.steps} steps)"

    def check_target(self, gradient, defense):
        if defense.name == "none" or gradient == "bpda":
            raise UserError("NeedsStates needs a purifier's states and gradients through it")


@pytest.fixture
def needs_states(monkeypatch):
    monkeypatch.setitem(ATTACKS._entries, "needs-states", Entry("needs-states", lambda **kw: [NeedsStates(**kw)]))


def _with_member(defense, gradient="full", members=({"name": "apgd-eot", "loss": "margin"}, {"name": "needs-states", "steps": 1})):
    return spec_from_preset("smoke", defense, gradient=gradient, attack={"name": "suite", "members": list(members)})


def test_members_that_do_not_apply_are_skipped_and_named_in_the_label(tmp_path, monkeypatch, needs_states):
    from hetpure_bench.bench.runner import run

    calls = _tiny_runs(monkeypatch)  # counts PGD-EOT's (so NeedsStates') attacks
    for defense, gradient, expected in (("none", "full", []), ("diffpure", "bpda", []), ("diffpure", "full", ["NeedsStates(1 steps)"])):
        spec = _with_member(defense, gradient)
        attacks, skipped = row_attacks(spec, placeholder_defense(spec))
        assert [a.name for a in attacks if isinstance(a, NeedsStates)] == expected
        assert [a.name for a in skipped] == ([] if expected else ["NeedsStates(1 steps)"])
    spec = _spec("none", evaluation="single", attack={"name": "suite", "members": [{"name": "apgd-eot", "steps": 1, "eot": 1},
                                                                                  {"name": "needs-states", "steps": 1}]})
    with ResultStore(tmp_path / "r.sqlite") as store:
        row = run(spec, store, progress=False)[0]
    assert calls == []  # the skipped member never ran
    assert row["attack"] == ("suite(APGD-EOT(Linf, margin, 1 iter, EOT 1, 1 restart); "
                             "skipped, not applicable: NeedsStates(1 steps))")
    assert row["robust_by_attack"] == "-" and [e["attack"] for e in row["convergence"]] == [
        "APGD-EOT(Linf, margin, 1 iter, EOT 1, 1 restart)"]


def test_an_attack_that_cannot_run_is_refused_before_any_work(needs_states):
    with pytest.raises(UserError, match="NeedsStates needs a purifier's states"):
        validate(spec_from_preset("smoke", "none", attack={"name": "needs-states"}))
    with pytest.raises(UserError, match="no member of the suite applies to defense 'none'"):
        validate(_with_member("none", members=[{"name": "needs-states"}]))
    validate(_with_member("none"))  # one member left: fine


def test_the_smoke_and_strong_presets_size_the_suite():
    smoke = spec_from_preset("smoke", "hetpure")
    assert smoke.attack["name"] == "pgd-eot"  # the main command's attack stays PGD-EOT
    members = _build(spec_from_preset("smoke", "hetpure", attack={"name": "suite"}).attack)
    assert [(getattr(a, "loss", None), a.steps, a.eot) for a in members] == [("margin", 10, 2), ("ce", 10, 2), (None, 5, 2)]
    from hetpure_bench.bench.spec import load_preset

    defenses = list(load_preset("strong")["defenses"])
    assert defenses == ["none", "diffpure", "hetpure"]
    for name in defenses:
        spec = spec_from_preset("strong", name)
        validate(spec)
        assert (spec.n_images, spec.evaluation, spec.attack["name"]) == (64, "expected:10,worst:10", "suite")
        assert [(getattr(a, "loss", None), a.steps, a.eot) for a in _build(spec.attack)] == [
            ("margin", 50, 4), ("ce", 50, 4), (None, 25, 4)]
        assert placeholder_defense(spec).nfe <= 10  # the smoke preset's grids
