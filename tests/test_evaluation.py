import pandas as pd
import pytest
import torch
from torch import nn

from hetpure_bench.attacks.pgd_eot import PGDEOT
from hetpure_bench.bench.batches import attack_and_evaluate, evaluate_batch
from hetpure_bench.bench.evaluation import (
    combine,
    judged_labels,
    outcomes,
    parse_evaluation_mode,
    predict,
    worst_case,
)
from hetpure_bench.bench.spec import RunSpec
from hetpure_bench.errors import UserError


class Scripted(nn.Module):
    """A 'defense' whose k-th call predicts script[k] (one label per image): known outcomes."""

    def __init__(self, script):
        super().__init__()
        self.script, self.calls = script, 0

    def reseed(self, seed):
        pass

    def forward(self, x):
        labels = torch.tensor(self.script[self.calls % len(self.script)])
        self.calls += 1
        return nn.functional.one_hot(labels, 10).float() + 0 * x.sum()


def test_worst_case_takes_the_first_wrong_label():
    predictions = torch.tensor([[0, 1, 2], [5, 1, 2], [6, 1, 9]])
    assert worst_case(predictions, torch.tensor([0, 1, 2])).tolist() == [5, 1, 9]


def test_each_mode_on_a_defense_with_known_outcomes():
    y = torch.tensor([0, 1, 2])
    # Image 0 is right 2 of 3 times, image 1 always, image 2 once.
    script = [[0, 1, 7], [4, 1, 2], [0, 1, 7]]
    assert predict(Scripted(script), torch.zeros(3, 1), y, "single").tolist() == [0, 1, 7]
    assert predict(Scripted(script), torch.zeros(3, 1), y, "vote:3").tolist() == [0, 1, 7]
    assert predict(Scripted(script), torch.zeros(3, 1), y, "worst:3").tolist() == [4, 1, 7]
    assert predict(Scripted(script), torch.zeros(3, 1), y, "worst:1").tolist() == [0, 1, 7]
    with pytest.raises(UserError):
        parse_evaluation_mode("worst:0")


@pytest.mark.parametrize("mode, robust", [("single", [True, True, False]), ("vote:3", [True, True, False]), ("worst:3", [False, True, False])])
def test_worst_of_n_in_the_runner_counts_an_image_broken_if_any_purification_fails(mode, robust):
    passes = parse_evaluation_mode(mode)[1]
    # The clean passes always right; the adversarial passes: image 0 right 2 of 3 times,
    # image 1 always, image 2 once (eps = 0 and no steps: the 'attack' leaves x unchanged).
    adversarial = [[0, 1, 7], [4, 1, 2], [0, 1, 7]][:passes]
    defense = Scripted([[0, 1, 2]] * passes + adversarial)
    spec = RunSpec(defense="scripted", eps=0.0, evaluation=mode, batch_size=3)
    x, y = torch.zeros(3, 1, 2, 2), torch.tensor([0, 1, 2])
    per_image = attack_and_evaluate(defense, defense, [PGDEOT(eps=0.0, steps=0, eot=1)], x, y, torch.arange(3), spec, progress=False)
    assert per_image["clean_correct"].all()
    assert per_image["robust_correct"].tolist() == robust


def test_expected_mode_parsing_and_its_outcomes_are_fractions_of_the_passes():
    assert parse_evaluation_mode("expected:10") == ("expected", 10)
    for bad in ("expected", "expected:0", "expected:x"):
        with pytest.raises(UserError, match="expected:K"):
            parse_evaluation_mode(bad)
    predictions = torch.tensor([[0, 1, 2], [5, 1, 2], [6, 1, 9], [0, 4, 2]])
    y = torch.tensor([0, 1, 2])
    assert judged_labels("expected:3", predictions, y).tolist() == predictions[:3].tolist()
    assert judged_labels("worst:3", predictions, y).tolist() == [[5, 1, 9]]
    correct = judged_labels("expected:4", predictions, y) == y
    assert outcomes("expected:4", correct) == [0.5, 0.75, 0.75]
    assert outcomes("single", judged_labels("single", predictions, y) == y) == [True, True, True]
    with pytest.raises(ValueError, match="no single label"):
        combine("expected:2", predictions, y)


def _judge(modes, clean, adversarial, y):
    """Records per mode from a scripted defense: ``clean`` and each attack's list in
    ``adversarial`` are the labels of passes 0, 1, ... (eps = 0 and no steps: no attack call)."""
    script = clean + [labels for attack in adversarial for labels in attack]
    defense = Scripted(script)
    x = torch.zeros(len(y), 1, 2, 2)
    attacks = [PGDEOT(eps=0.0, steps=0, eot=1) for _ in adversarial]
    records, _, _, _ = evaluate_batch(defense, defense, attacks, x, torch.tensor(y), torch.arange(len(y)), 0, modes)
    assert defense.calls == len(script)  # every mode judged from the same passes
    return {mode: pd.DataFrame(rows) for mode, rows in records.items()}


def test_expected_pairs_each_clean_pass_with_the_same_adversarial_pass():
    y = [0, 1, 2]
    clean = [[0, 1, 2], [0, 9, 2], [0, 1, 2], [5, 1, 2]]
    adversarial = [[[0, 1, 7], [0, 1, 2], [3, 1, 2], [0, 1, 2]]]
    frames = _judge(["single", "expected:1", "worst:4", "expected:4"], clean, adversarial, y)
    expected = frames["expected:4"]
    assert expected["clean_correct"].tolist() == [0.75, 0.75, 1.0]
    # Image 0: passes 0 and 1 right for both, pass 2 adversarial wrong, pass 3 clean wrong -> 2/4
    # (not 3/4, the adversarial passes alone); image 1: pass 1 clean wrong; image 2: pass 0 adversarial wrong.
    assert expected["robust_correct"].tolist() == [0.5, 0.75, 0.75]
    assert expected["clean_pred"].tolist() == [0, 1, 2] and expected["adv_pred"].tolist() == [0, 1, 7]  # the first pass
    assert frames["worst:4"]["robust_correct"].tolist() == [False, False, False]
    single, one = frames["single"], frames["expected:1"]
    assert single["robust_correct"].tolist() == [True, True, False]
    assert one["robust_correct"].dtype == float and one["clean_correct"].dtype == float
    for column in single.columns:  # expected:1 is single, with fractions for booleans
        assert one[column].tolist() == single[column].astype(one[column].dtype).tolist(), column


def test_expected_with_two_attacks_is_robust_in_a_pass_only_if_every_attack_fails_in_it():
    y = [0, 1]
    clean = [[0, 1], [0, 1]]
    adversarial = [[[0, 5], [9, 1]], [[8, 1], [0, 1]]]
    frame = _judge(["expected:2"], clean, adversarial, y)["expected:2"]
    assert frame["robust_correct_0"].tolist() == [0.5, 0.5]
    assert frame["robust_correct_1"].tolist() == [0.5, 1.0]
    # Image 0 survives each attack in one pass, but never both in the same pass.
    assert frame["robust_correct"].tolist() == [0.0, 0.5]
    assert frame["adv_pred"].tolist() == [8, 5]  # the first wrong label of pass 0
