import pytest
import torch
from torch import nn

from hetpure_bench.defenses.attention_mask import (
    MaskConfig,
    attention_mask,
    capture_attention,
    normalise_map,
    threshold_map,
    union_map,
)
from hetpure_bench.errors import UserError
from hetpure_bench.models.classifiers import MASK_HOOKS


class Planted(nn.Module):
    """Returns fixed activations from two named blocks, so the mask can be computed by hand."""

    def __init__(self, a1, a2):
        super().__init__()
        self.block_a = nn.Identity()
        self.block_b = nn.Identity()
        self.a1, self.a2 = a1, a2

    def forward(self, x):
        self.block_a(self.a1.expand(x.shape[0], -1, -1, -1))
        self.block_b(self.a2.expand(x.shape[0], -1, -1, -1))
        return torch.zeros(x.shape[0], 10)


def test_mask_on_planted_activations_is_hand_computed():
    # Block A (2 channels, 2x2): sum_c |A|^2 = [[0, 1], [4, 25]] -> min-max [[0, .04], [.16, 1]].
    a1 = torch.tensor([[[0.0, 1.0], [2.0, 3.0]], [[0.0, 0.0], [0.0, -4.0]]]).unsqueeze(0)
    # Block B (1 channel, 2x2) is constant except one pixel.
    a2 = torch.tensor([[[[1.0, 1.0], [1.0, 3.0]]]])
    model = Planted(a1, a2)
    x = torch.zeros(1, 3, 2, 2)  # image size equals the maps' size: upsampling is the identity
    config = MaskConfig(hooks=("block_a", "block_b"), tau=0.9)
    mask = attention_mask(model, x, config)
    # union = max([[0,.04],[.16,1]], [[0,0],[0,1]]) -> only the bottom-right pixel reaches 0.9.
    assert mask.tolist() == [[[[0.0, 0.0], [0.0, 1.0]]]]
    assert attention_mask(model, x, MaskConfig(hooks=("block_a", "block_b"), tau=0.1)).tolist() == [[[[0.0, 0.0], [1.0, 1.0]]]]


def test_p_norm_changes_the_map():
    a1 = torch.tensor([[[[1.0, -2.0], [0.0, 0.0]]]])
    with capture_attention(Planted(a1, a1), ("block_a",), p=1) as maps:
        Planted(a1, a1)(torch.zeros(1, 3, 2, 2))
    # hooks are on the first model instance only: a second instance captures nothing
    assert maps == {}
    model = Planted(a1, a1)
    with capture_attention(model, ("block_a",), p=1) as maps:
        model(torch.zeros(1, 3, 2, 2))
    assert maps["block_a"].tolist() == [[[[1.0, 2.0], [0.0, 0.0]]]]


def test_bilinear_upsampling_and_union():
    small = torch.tensor([[[[0.0, 1.0], [0.0, 0.0]]]])
    union = union_map([small], (4, 4), "minmax")
    assert union.shape == (1, 1, 4, 4)
    assert union[0, 0, 0, 3].item() == 1.0 and union[0, 0, 3, 0].item() == 0.0


def test_softmax_normalisation_keeps_the_order_and_peaks_at_one():
    a = torch.tensor([[[[0.0, 1.0], [2.0, 3.0]]]])
    n = normalise_map(a, "softmax")
    assert n.max().item() == pytest.approx(1.0)
    assert torch.equal(n.flatten().argsort(), a.flatten().argsort())


def test_top_percent():
    union = torch.arange(16.0).view(1, 1, 4, 4) / 15
    assert threshold_map(union, 0.9, top_percent=25).sum().item() == 4
    assert threshold_map(union, 0.9, top_percent=None).sum().item() == 2  # 14/15, 15/15


def test_hooks_are_removed_also_after_an_exception():
    model = nn.Sequential(nn.Conv2d(3, 2, 1), nn.ReLU())
    with pytest.raises(RuntimeError):
        with capture_attention(model, ("0",), p=2):
            raise RuntimeError("boom")
    assert not model[0]._forward_hooks
    attention_mask(model, torch.rand(1, 3, 4, 4), MaskConfig(hooks=("0",)))
    assert not model[0]._forward_hooks


def test_unknown_hook_and_bad_config_are_user_errors():
    with pytest.raises(UserError, match="no module"):
        attention_mask(nn.Sequential(nn.ReLU()), torch.rand(1, 3, 4, 4), MaskConfig(hooks=("layer9",)))
    with pytest.raises(UserError):
        MaskConfig(normalise="max")


def test_reference_quirk_feeds_imagenet_normalised_minus_one_one_input():
    seen = {}

    class Spy(nn.Module):
        def __init__(self):
            super().__init__()
            self.layer1 = nn.Identity()

        def forward(self, x):
            seen["x"] = x
            return self.layer1(x)

    x = torch.full((1, 3, 2, 2), 0.5)
    attention_mask(Spy(), x, MaskConfig(hooks=("layer1",), reference_input=True))
    assert seen["x"][0, 0, 0, 0].item() == pytest.approx((0.0 - 0.485) / 0.229)
    attention_mask(Spy(), x, MaskConfig(hooks=("layer1",)))
    assert torch.equal(seen["x"], x)


def test_hook_specifications_name_real_modules():
    import torchvision
    from pyautoattack.examples.resnet import ResNet18

    from hetpure_bench.models.robustbench_compat import import_robustbench

    import_robustbench()
    from robustbench.model_zoo.architectures.dm_wide_resnet import DMWideResNet
    from robustbench.model_zoo.architectures.wide_resnet import WideResNet

    with torch.device("meta"):  # full-size architectures, no memory
        architectures = {
            "wrn-28-10": WideResNet(depth=28, widen_factor=10),
            "dm-wrn-70-16": DMWideResNet(num_classes=10, depth=70, width=16),
            "resnet-18": ResNet18(),
            "resnet-50": torchvision.models.resnet50(),
        }
    for name, model in architectures.items():
        assert set(MASK_HOOKS[name]) <= set(dict(model.named_modules())), name
