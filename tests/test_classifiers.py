import pytest
import torch

from hetpure_bench.data import load_cifar10
from hetpure_bench.errors import UnknownNameError, UserError
from hetpure_bench.models.classifiers import CLASSIFIERS, load_classifier


def test_embedded_resnet18_is_registered_and_offline():
    entry = CLASSIFIERS.get("resnet18-pyautoattack")
    assert entry.available() and entry.info["input_range"].startswith("[0,1]")


def test_embedded_resnet18_is_frozen_and_classifies_real_images(shared_jpeg):
    model = load_classifier("resnet18-pyautoattack")
    assert not model.training and not any(p.requires_grad for p in model.parameters())
    assert sum(p.numel() for p in model.parameters()) == 11_173_962
    data = load_cifar10(str(shared_jpeg), "test").subset(200, seed=0)
    with torch.no_grad():
        logits = model(data.as_float())
    assert logits.shape == (200, 10)
    accuracy = (logits.argmax(1) == data.labels).float().mean().item()
    assert 0.80 <= accuracy <= 0.95  # 86.5% on 2,000 JPEG images (ENVIRONMENT.md)


def test_unknown_classifier():
    with pytest.raises(UnknownNameError, match="did you mean 'resnet18-pyautoattack'"):
        load_classifier("resnet18-autoattack")


@pytest.mark.parametrize("name, published", [
    ("wrn-28-10-standard", 36_479_194),  # RobustBench lists 36.5M
    ("wrn-70-16-dm", 266_796_506),  # Gowal et al. 2020: 267M
    ("wrn-70-16-dropout", 266_796_506),
])
def test_full_size_architectures_on_the_meta_device_have_the_published_sizes(name, published):
    entry = CLASSIFIERS.get(name)
    with torch.device("meta"):
        model = entry.info["build_architecture"]()
    assert sum(p.numel() for p in model.parameters()) == published == entry.info["parameters"]
    names = dict(model.named_modules())
    assert all(hook in names for hook in entry.info["mask_hooks"])


def _write_robustbench_standard(path, state):
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.save({"state_dict": {f"module.{k}": v for k, v in state.items()}}, path)


def test_robustbench_checkpoint_goes_through_robustbench_loader_and_is_pinned(monkeypatch):
    from hetpure_bench.errors import ChecksumError
    from hetpure_bench.models.artifacts import get_artifact
    from hetpure_bench.models.classifiers import _robustbench_architecture, robustbench_file

    torch.manual_seed(0)
    state = {k: v.half() if v.is_floating_point() else v for k, v in _robustbench_architecture("Standard").state_dict().items()}
    path = robustbench_file("Standard", "Linf")
    assert path == get_artifact("robustbench-cifar10-linf-standard").local_path
    _write_robustbench_standard(path, state)
    model = load_classifier("wrn-28-10-standard")
    assert torch.equal(model.conv1.weight, state["conv1.weight"].float())
    assert model.mask_hooks[0] == "block1.layer.3.relu2" and not model.training
    # A later swap or corruption is caught by the pinned sha256 ...
    _write_robustbench_standard(path, {k: v + 1 if v.is_floating_point() else v for k, v in state.items()})
    with pytest.raises(ChecksumError, match="changed since it was first verified"):
        load_classifier("wrn-28-10-standard")
    # ... a truncated file and an HTML page by the loader.
    path.write_bytes(path.read_bytes()[:1000])
    with pytest.raises(ChecksumError, match="corrupt or truncated"):
        load_classifier("wrn-28-10-standard")
    path.write_bytes(b"<!DOCTYPE html><html>Google Drive can't scan this file</html>")
    with pytest.raises(ChecksumError, match="HTML"):
        load_classifier("wrn-28-10-standard")


def test_offline_robustbench_download_is_one_line_and_leaves_nothing(monkeypatch):
    import robustbench.utils

    from hetpure_bench.models.artifacts import MissingArtifactError
    from hetpure_bench.models.classifiers import robustbench_file

    def offline(*args, **kwargs):
        raise ConnectionError("no route to drive.google.com")

    monkeypatch.setattr(robustbench.utils, "download_gdrive_new", offline)
    with pytest.raises(MissingArtifactError, match="put the file at") as info:
        load_classifier("robustbench:Carmon2019Unlabeled")
    assert "\n" not in str(info.value) and not robustbench_file("Carmon2019Unlabeled", "Linf").exists()
    with pytest.raises(UserError, match="unknown RobustBench"):
        load_classifier("robustbench:NoSuchModel2099")


def test_user_supplied_weights_fail_clearly(tmp_path):
    from hetpure_bench.errors import ChecksumError
    from hetpure_bench.models.artifacts import MissingArtifactError
    from hetpure_bench.models.classifiers import load_state_dict_file

    with pytest.raises(MissingArtifactError, match="download it by hand"):
        load_classifier("wrn-70-16-dm")
    small = torch.nn.Linear(3, 2)
    good = tmp_path / "ok.pt"
    torch.save({"state_dict": {"module." + k: v for k, v in small.state_dict().items()}}, good)
    assert torch.equal(load_state_dict_file(good, torch.nn.Linear(3, 2)).weight, small.weight)
    with pytest.raises(ChecksumError, match="does not fit the architecture"):
        load_state_dict_file(good, torch.nn.Linear(4, 2))
    bad = tmp_path / "bad.pt"
    bad.write_bytes(good.read_bytes()[:50])
    with pytest.raises(ChecksumError, match="not a readable checkpoint"):
        load_state_dict_file(bad, torch.nn.Linear(3, 2))


# DiffPure's WRN-70-16 files, in their real formats, at depth 10 and width 1 (same classes, same
# loading code as the registered 70-16 entries): outputs compared with the plain network on an
# input normalised by hand with DiffPure's CIFAR-10 constants.
MEAN = torch.tensor([0.4914, 0.4822, 0.4465], dtype=torch.float64).view(1, 3, 1, 1)
STD = torch.tensor([0.2471, 0.2435, 0.2616], dtype=torch.float64).view(1, 3, 1, 1)


def _randomise(model, seed):
    """Random weights and batch-norm statistics (running_var > 0), so every layer matters."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, tensor in model.state_dict().items():
            if tensor.is_floating_point():
                value = torch.rand(tensor.shape, generator=generator, dtype=torch.float64)
                tensor.copy_(value + 0.5 if name.endswith("running_var") else (value - 0.5) * 0.6)
    return model


def _robustbench_architectures():
    from hetpure_bench.models.robustbench_compat import import_robustbench

    import_robustbench()  # robustbench imports autoattack, which pyautoattack provides
    from robustbench.model_zoo.architectures import dm_wide_resnet, wide_resnet

    return wide_resnet, dm_wide_resnet


def _images():
    return torch.rand(2, 3, 32, 32, generator=torch.Generator().manual_seed(3), dtype=torch.float64)


def test_wrn_70_16_dropout_file_loads_and_normalises_inside(tmp_path):
    from hetpure_bench.models.classifiers import load_state_dict_file, wrn_dropout

    plain = _randomise(_robustbench_architectures()[0].WideResNet(depth=10, widen_factor=1, dropRate=0.3), seed=0).double().eval()
    path = tmp_path / "weights.pt"
    # DiffPure's weights.pt: a bare DataParallel state dict (its loader cuts the 7 characters "module.").
    torch.save({f"module.{k}": v for k, v in plain.state_dict().items()}, path)

    model = load_state_dict_file(path, wrn_dropout(depth=10, width=1)).double()
    assert "mean" not in model.state_dict() and "std" not in model.state_dict()
    x = _images()
    with torch.no_grad():
        # Tolerance: the constants are float32 tensors (as in the reference), x is float64.
        torch.testing.assert_close(model(x), plain((x - MEAN) / STD), rtol=1e-6, atol=1e-8)
        assert not torch.allclose(model(x), plain(x))


def test_dm_wrn_70_16_file_under_model_state_dict_loads(tmp_path):
    from hetpure_bench.models.classifiers import dm_wrn, load_state_dict_file

    dm = _robustbench_architectures()[1]
    plain = dm.DMWideResNet(num_classes=10, depth=10, width=1, activation_fn=dm.Swish, mean=(0.0, 0.0, 0.0), std=(1.0, 1.0, 1.0))
    plain = _randomise(plain, seed=1).double().eval()
    path = tmp_path / "weights-best.pt"
    # DiffPure's weights-best.pt: {"model_state_dict": keys "module.0.<name>"} (its loader cuts 9 characters).
    torch.save({"model_state_dict": {f"module.0.{k}": v for k, v in plain.state_dict().items()}}, path)

    model = load_state_dict_file(path, dm_wrn(depth=10, width=1)).double()
    x = _images()
    with torch.no_grad():
        torch.testing.assert_close(model(x), plain((x - MEAN) / STD), rtol=1e-6, atol=1e-8)


def test_registered_wrn_70_16_builders_normalise_and_expect_no_constants_in_the_state_dict():
    for name in ("wrn-70-16-dropout", "wrn-70-16-dm"):
        with torch.device("meta"):
            model = CLASSIFIERS.get(name).info["build_architecture"]()
        buffers = dict(model.named_buffers())
        assert buffers["mean"].shape == buffers["std"].shape == (3, 1, 1)
        assert "mean" not in model.state_dict() and "std" not in model.state_dict()
    with torch.device("meta"):
        plain = _robustbench_architectures()[0].WideResNet(depth=70, widen_factor=16, dropRate=0.3)
        dropout = CLASSIFIERS.get("wrn-70-16-dropout").info["build_architecture"]()
    assert list(dropout.state_dict()) == list(plain.state_dict())  # the file's keys, nothing added
