import pytest

from hetpure_bench.attacks.apgd import APGDEOT
from hetpure_bench.attacks.autoattack import AutoAttackSuite
from hetpure_bench.attacks.pgd_eot import PGDEOT
from hetpure_bench.attacks.torchattacks_adapter import TorchAttack
from hetpure_bench.bench.cost import PassTimes, estimate, forward_queries, gradient_evaluations
from hetpure_bench.cli import main


def test_gradient_evaluations_per_attack():
    assert gradient_evaluations(PGDEOT(steps=200, eot=20)) == 4000
    assert forward_queries(PGDEOT(steps=200, eot=20)) == 20  # the returned iterate's check
    assert forward_queries(PGDEOT(steps=0, eot=20)) == 0  # no step, nothing to check
    assert gradient_evaluations(APGDEOT(steps=100, eot=20, restarts=2)) == 2 * 101 * 20
    assert gradient_evaluations(AutoAttackSuite(version="rand")) == 2 * 100 * 20
    assert gradient_evaluations(AutoAttackSuite(version="standard")) == 100 * (1 + 2 * 9)
    assert gradient_evaluations(TorchAttack.from_settings("Linf", 0.03, 0, attack="EOTPGD", steps=10, eot_iter=3)) == 30
    assert gradient_evaluations(TorchAttack.from_settings("Linf", 0.03, 0, attack="FGSM")) == 1


def test_estimate_against_a_hand_computed_paper_row():
    times = PassTimes("cpu", 4, diffusion_forward=1.0, diffusion_forward_backward=2.0, classifier_forward=0.5, classifier_forward_backward=1.0)
    cost = estimate([PGDEOT(steps=200, eot=20)], defense_nfe=100, gradient="full", evaluation="vote:20", images=512, times=times)
    # attack: 4000 gradient evaluations x 100 calls and the returned iterate's check, 20 copies x 100
    # calls forward; evaluation: (clean + adversarial) x 20 votes x 100 calls
    assert cost.network_calls_per_image == 4000 * 100 + 20 * 100 + 2 * 20 * 100
    assert cost.classifier_passes_per_image == 4000 + 20 + 40
    assert cost.seconds_per_image == pytest.approx(4000 * 100 * 3.0 + 6000 * 1.0 + 4000 * 1.0 + 60 * 0.5)
    assert cost.hours == pytest.approx(cost.seconds_per_image * 512 / 3600)
    surrogate = estimate([PGDEOT(steps=200, eot=20)], 100, "surrogate:2", "vote:20", 512, times, surrogate_nfe=2)
    assert surrogate.network_calls_per_image == 4000 * 2 + 6000
    bpda = estimate([PGDEOT(steps=200, eot=20)], 100, "bpda", "single", 512, times)
    assert bpda.seconds_per_image == pytest.approx(4000 * 100 * 1.0 + 22 * 100 * 1.0 + 4000 * 1.0 + 22 * 0.5)


def test_dry_run_prints_each_row_and_runs_nothing(tmp_path, capsys):
    assert main(["run", "--dry-run", "--defense", "hetpure,none", "--evaluation", "single,vote:3",
                 "--leaderboard-dir", str(tmp_path / "lb")]) == 0
    out = capsys.readouterr().out
    assert out.count("| hetpure | embedded-denoiser | 10 |") == 2 and "| none | - | 0 |" in out
    # 10 steps x EOT 2 x 10 calls + the returned iterate's check (EOT 2 x 10) + (clean + adversarial) x 10 calls
    assert "| 240 |" in out
    # Wilson at 16 of 32 images: [0.3363, 0.6637], half-width 16 points (test_statistics).
    assert out.count("(32 images) | +-16 points |") == 4
    assert ("sizing: +-16 points at 32 images (half-width of the 95% Wilson interval at 50% accuracy, the widest); "
            "64 images give +-12, 128 images give +-9, 256 images give +-6, 512 images give +-4") in out
    assert not (tmp_path / "lb").exists() or not any((tmp_path / "lb").iterdir())


def test_readme_sizing_table_is_the_one_the_dry_run_prints():
    from pathlib import Path

    from hetpure_bench.bench.dry_run import SIZES, points

    readme = (Path(__file__).resolve().parents[1] / "README.md").read_text()
    sizes = "| images | " + " | ".join(str(n) for n in SIZES) + " |"
    widths = "| interval half-width (points) | " + " | ".join(f"+-{points(n)}" for n in SIZES) + " |"
    assert f"{sizes}\n|---|---|---|---|---|---|\n{widths}\n" in readme


@pytest.mark.slow
def test_paper_preset_dry_run_times_the_real_architectures(capsys):
    assert main(["run", "--preset", "paper-wrn28-linf", "--dry-run", "--defense", "hetpure,diffpure"]) == 0
    out = capsys.readouterr().out
    assert "random weights of the same architecture" in out and "| hetpure | score-sde-ddpmpp | 100 |" in out
    assert "--- sibling preset paper-wrn28-linf-reference ---" in out  # both protocol families
    assert "| surrogate:2 |" in out and "| full |" in out
