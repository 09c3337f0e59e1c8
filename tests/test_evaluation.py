import pytest
import torch
from torch import nn

from hetpure_bench.attacks.pgd_eot import PGDEOT
from hetpure_bench.errors import UserError
from hetpure_bench.evaluation import parse_evaluation_mode, predict, worst_case
from hetpure_bench.runner import RunSpec, attack_and_evaluate


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
