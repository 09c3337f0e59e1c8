import importlib.metadata
import sys

import pyautoattack

from hetpure_bench.models.robustbench_compat import import_robustbench


def test_robustbench_imports_through_the_alias():
    robustbench = import_robustbench()
    assert sys.modules["autoattack"] is pyautoattack
    assert callable(robustbench.load_model)
    # robustbench's evaluation code now holds pyautoattack's real AutoAttack class.
    assert sys.modules["robustbench.eval"].AutoAttack is pyautoattack.AutoAttack


def test_installed_robustbench_is_1_1_1_not_torchattacks_stale_copy():
    import_robustbench()
    from robustbench.model_zoo.cifar10 import linf

    assert importlib.metadata.version("robustbench") == "1.1.1"
    # Files from torchattacks' stale bundled copy would lack the models added after 2022.
    assert "Standard" in linf and "Bartoldson2024Adversarial_WRN-94-16" in linf


def test_torchattacks_is_installed_and_usable():
    import torchattacks

    assert hasattr(torchattacks, "EOTPGD") and hasattr(torchattacks, "APGD")
