"""The classifier registry. Every classifier takes images in [0, 1] and returns logits.

Besides the registered names, ``robustbench:<Name>`` (or ``robustbench:<Name>@L2``) loads any
RobustBench CIFAR-10 zoo model through robustbench's own loader, cached under $HETPURE_HOME.
"""

from __future__ import annotations

import pickle
from importlib import resources
from pathlib import Path
from typing import Callable

import torch
from torch import nn

from ..errors import ChecksumError, UserError
from ..registry import Entry, Registry
from .artifacts import MissingArtifactError, artifact_index, check_format, fetch, get_artifact, verify
from .cache import hetpure_home
from .robustbench_compat import import_robustbench

ROBUSTBENCH_PREFIX = "robustbench:"

CLASSIFIERS: Registry[nn.Module] = Registry("classifier")

# The blocks the attention mask (defenses/attention_mask.py) hooks, per architecture (module names relative to the classifier; see METHOD.md).
MASK_HOOKS: dict[str, tuple[str, ...]] = {
    # RobustBench WideResNet-28-10: inner ReLU of the last block of each group + final ReLU.
    "wrn-28-10": ("block1.layer.3.relu2", "block2.layer.3.relu2", "block3.layer.3.relu2", "relu"),
    # DeepMind-style WRN-70-16 (11 blocks per group): relu_1 of each group's last block + final ReLU.
    "dm-wrn-70-16": ("layer.0.block.10.relu_1", "layer.1.block.10.relu_1", "layer.2.block.10.relu_1", "relu"),
    # RobustBench-style WideResNet-70-16 (11 blocks per group), as in DiffPure's wrn-70-16-dropout.
    "wrn-70-16": ("block1.layer.10.relu2", "block2.layer.10.relu2", "block3.layer.10.relu2", "relu"),
    "resnet-18": ("layer1", "layer2", "layer3", "layer4"),
    "resnet-50": ("layer1", "layer2", "layer3", "layer4"),
}


def _pyautoattack_resnet18_path() -> Path:
    return Path(str(resources.files("pyautoattack") / "examples" / "model_test.pt"))


def load_pyautoattack_resnet18() -> nn.Module:
    """The standard-trained CIFAR-10 ResNet-18 shipped inside the pyautoattack wheel."""
    from pyautoattack.examples.resnet import ResNet18

    model = ResNet18()
    state = torch.load(_pyautoattack_resnet18_path(), map_location="cpu", weights_only=True)
    model.load_state_dict(state)
    return model.eval()


CLASSIFIERS.register(
    "resnet18-pyautoattack",
    load_pyautoattack_resnet18,
    available=lambda: _pyautoattack_resnet18_path().is_file(),
    architecture="ResNet-18",
    mask_hooks=MASK_HOOKS["resnet-18"],
    training="standard (no adversarial training)",
    input_range="[0,1], no normalisation",
    source="pyautoattack wheel, examples/model_test.pt",
    note="embedded default; 86.5% clean on 2,000 images of the JPEG CIFAR-10 copy (ENVIRONMENT.md)",
)


def robustbench_dir() -> Path:
    return hetpure_home() / "robustbench"


def robustbench_file(name: str, threat: str) -> Path:
    return robustbench_dir() / "cifar10" / threat / f"{name}.pt"


def robustbench_zoo(threat: str) -> dict:
    """RobustBench's CIFAR-10 model table for a threat model (name -> architecture, gdrive id)."""
    import_robustbench()
    from robustbench.model_zoo import model_dicts
    from robustbench.model_zoo.enums import BenchmarkDataset, ThreatModel

    try:
        return model_dicts[BenchmarkDataset("cifar10")][ThreatModel(threat)]
    except ValueError:
        raise UserError(f"unknown RobustBench threat model {threat!r}: use Linf, L2 or corruptions") from None


def load_robustbench(name: str, threat: str = "Linf") -> nn.Module:
    """A RobustBench CIFAR-10 zoo model via robustbench.load_model (which downloads from Google
    Drive without a checksum: the file is format-checked and its sha256 pinned on first use)."""
    robustbench = import_robustbench()
    if name not in robustbench_zoo(threat):
        raise UserError(f"unknown RobustBench CIFAR-10 {threat} model {name!r} (e.g. Standard, Carmon2019Unlabeled)")
    path = robustbench_file(name, threat)
    existed = path.exists()
    if existed:
        check_format(path)
    try:
        model = robustbench.load_model(model_name=name, model_dir=robustbench_dir(), dataset="cifar10", threat_model=threat)
    except (RuntimeError, pickle.UnpicklingError, EOFError, KeyError, ValueError) as exc:
        if not existed:
            path.unlink(missing_ok=True)  # what a failed download left behind
        raise ChecksumError(f"{path} is corrupt or truncated ({type(exc).__name__}): delete it and load again") from None
    except Exception as exc:  # robustbench/gdown raise many kinds of network errors
        path.unlink(missing_ok=True)
        raise MissingArtifactError(
            f"RobustBench model {name} ({threat}) is not cached and could not be downloaded "
            f"({type(exc).__name__}): put the file at {path}"
        ) from None
    artifact = f"robustbench-cifar10-{threat.lower()}-{name.lower()}"
    if artifact in artifact_index():
        verify(get_artifact(artifact), path)
    return model


# Where a training script keeps the weights inside its checkpoint dict: "model_state_dict" in
# DiffPure's DeepMind-style WRN-70-16, "state_dict" in RobustBench-style files.
_STATE_DICT_KEYS = ("model_state_dict", "state_dict")


def _strip_wrappers(state: dict, model: nn.Module) -> dict:
    """Drop DataParallel's "module." and, when every key has it and the model has no such keys,
    the "0." of an nn.Sequential around the network (DiffPure's DM WRN-70-16 keys begin
    "module.0.")."""
    state = {k.removeprefix("module."): v for k, v in state.items()}
    own_keys = model.state_dict().keys()
    if state and all(k.startswith("0.") for k in state) and not any(k.startswith("0.") for k in own_keys):
        state = {k.removeprefix("0."): v for k, v in state.items()}
    return state


def load_state_dict_file(path: Path, model: nn.Module) -> nn.Module:
    """Load a state dict saved by torch: bare, or under "model_state_dict" or "state_dict", with
    the key prefixes of ``_strip_wrappers``."""
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # truncated zip, pickle error, HTML page...
        raise ChecksumError(f"{path} is not a readable checkpoint ({type(exc).__name__}): delete it and download it again") from None
    for key in _STATE_DICT_KEYS:
        if isinstance(state, dict) and isinstance(state.get(key), dict):
            state = state[key]
            break
    if not isinstance(state, dict):
        raise ChecksumError(f"{path} does not hold a state dict")
    state = _strip_wrappers(state, model)
    try:
        model.load_state_dict(state)
    except RuntimeError as exc:
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else "mismatch"
        raise ChecksumError(f"{path} does not fit the architecture: {first}") from None
    return model.eval()


def dm_wrn(depth: int = 70, width: int = 16) -> nn.Module:
    """DiffPure's DeepMind-style WRN-70-16 (Swish; RobustBench's ``DMWideResNet`` normalises with
    the CIFAR-10 mean/std itself); smaller depth and width only for tests."""
    import_robustbench()
    from robustbench.model_zoo.architectures.dm_wide_resnet import DMWideResNet, Swish

    return DMWideResNet(num_classes=10, depth=depth, width=width, activation_fn=Swish)


CIFAR10_MEAN = (0.4914, 0.4822, 0.4465)
CIFAR10_STD = (0.2471, 0.2435, 0.2616)


def _normalise_input(model: nn.Module, args: tuple) -> tuple:
    return ((args[0] - model.mean) / model.std, *args[1:])


def with_cifar10_normalisation(model: nn.Module) -> nn.Module:
    """Make ``model`` normalise its [0,1] input with the CIFAR-10 mean and std first, as DiffPure's
    own WideResNet does inside its forward. A forward pre-hook keeps the layer names (and so the
    state dict keys and the attention-mask hooks) those of the plain network; the constants are
    non-persistent buffers, so they follow ``.to()`` and a state dict neither has nor needs them."""
    model.register_buffer("mean", torch.tensor(CIFAR10_MEAN).view(3, 1, 1), persistent=False)
    model.register_buffer("std", torch.tensor(CIFAR10_STD).view(3, 1, 1), persistent=False)
    model.register_forward_pre_hook(_normalise_input)
    return model


def wrn_dropout(depth: int = 70, width: int = 16) -> nn.Module:
    """DiffPure's ``WideResNet_70_16_dropout``: RobustBench's (TRADES) WideResNet with dropout
    0.3 and the CIFAR-10 normalisation inside (smaller depth and width only for tests)."""
    import_robustbench()
    from robustbench.model_zoo.architectures.wide_resnet import WideResNet

    return with_cifar10_normalisation(WideResNet(depth=depth, widen_factor=width, dropRate=0.3))


def _from_artifact(artifact: str, architecture: Callable[[], nn.Module]) -> Callable[[], nn.Module]:
    return lambda: load_state_dict_file(fetch(artifact), architecture())


def _artifact_present(artifact: str) -> Callable[[], bool]:
    return lambda: get_artifact(artifact).local_path.is_file()


CLASSIFIERS.register(
    "wrn-28-10-standard",
    lambda: load_robustbench("Standard", "Linf"),
    available=lambda: robustbench_file("Standard", "Linf").is_file(),
    architecture="WideResNet-28-10 (RobustBench)", parameters=36_479_194, build_architecture=lambda: _robustbench_architecture("Standard"),
    mask_hooks=MASK_HOOKS["wrn-28-10"], training="standard", input_range="[0,1], no normalisation",
    source="RobustBench model zoo 'Standard' (cifar10, Linf); 94.78% clean",
)
# DiffPure's WRN-70-16 classifiers: weights fetched by hand (artifacts.yaml), architectures here.
for _name, _artifact, _build, _hooks, _architecture, _input in (
    ("wrn-70-16-dm", "diffpure-wrn-70-16", dm_wrn, "dm-wrn-70-16",
     "DeepMind-style WideResNet-70-16, Swish, CIFAR-10 mean/std inside", "[0,1] (normalised inside the network)"),
    ("wrn-70-16-dropout", "diffpure-wrn-70-16-dropout", wrn_dropout, "wrn-70-16",
     "WideResNet-70-16, dropout 0.3, CIFAR-10 mean/std inside", "[0,1] (normalised inside the network)"),
):
    CLASSIFIERS.register(
        _name, _from_artifact(_artifact, _build), available=_artifact_present(_artifact),
        architecture=_architecture, parameters=266_796_506, build_architecture=_build,
        mask_hooks=MASK_HOOKS[_hooks], training="standard", input_range=_input,
        source=f"DiffPure's standard-trained classifier (artifact {_artifact})",
    )


def _robustbench_architecture(name: str, threat: str = "Linf") -> nn.Module:
    return robustbench_zoo(threat)[name]["model"]()


def classifier_entry(name: str) -> Entry[nn.Module]:
    """The registry entry of ``name``; ``robustbench:<Name>[@threat]`` gives a zoo model."""
    if not name.startswith(ROBUSTBENCH_PREFIX):
        return CLASSIFIERS.get(name)
    zoo_name, _, threat = name[len(ROBUSTBENCH_PREFIX):].partition("@")
    threat = threat or "Linf"
    if not zoo_name:
        raise UserError("use robustbench:<ModelName>, e.g. robustbench:Standard or robustbench:Rebuffi2021Fixing_70_16_cutmix_extra@L2")
    return Entry(
        name, lambda: load_robustbench(zoo_name, threat),
        {"architecture": f"RobustBench {zoo_name} ({threat})", "source": "RobustBench model zoo", "mask_hooks": ()},
        lambda: robustbench_file(zoo_name, threat).is_file(),
    )


def load_classifier(name: str) -> nn.Module:
    """Build a classifier (registered, or robustbench:<Name>) in eval mode with frozen parameters.

    The model carries ``mask_hooks``: the blocks the attention mask of hetpure hooks.
    """
    entry = classifier_entry(name)
    model = entry.build()
    model.requires_grad_(False)
    model.mask_hooks = tuple(entry.info.get("mask_hooks", ()))
    return model.eval()
