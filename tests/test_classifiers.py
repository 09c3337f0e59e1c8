import pytest
import torch

from hetpure_bench.classifiers import CLASSIFIERS, load_classifier
from hetpure_bench.data import load_cifar10
from hetpure_bench.errors import UnknownNameError, UserError


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
    from hetpure_bench.artifacts import get_artifact
    from hetpure_bench.classifiers import _robustbench_architecture, robustbench_file
    from hetpure_bench.errors import ChecksumError

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

    from hetpure_bench.artifacts import MissingArtifactError
    from hetpure_bench.classifiers import robustbench_file

    def offline(*args, **kwargs):
        raise ConnectionError("no route to drive.google.com")

    monkeypatch.setattr(robustbench.utils, "download_gdrive_new", offline)
    with pytest.raises(MissingArtifactError, match="put the file at") as info:
        load_classifier("robustbench:Carmon2019Unlabeled")
    assert "\n" not in str(info.value) and not robustbench_file("Carmon2019Unlabeled", "Linf").exists()
    with pytest.raises(UserError, match="unknown RobustBench"):
        load_classifier("robustbench:NoSuchModel2099")


def test_user_supplied_weights_fail_clearly(tmp_path):
    from hetpure_bench.artifacts import MissingArtifactError
    from hetpure_bench.classifiers import load_state_dict_file
    from hetpure_bench.errors import ChecksumError

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
