"""Make ``import robustbench`` work with pyautoattack.

robustbench 1.1.1 imports ``autoattack`` and ``autoattack.state``, but its PyPI dependency
ships that code as ``pyautoattack``. Aliasing the modules before the first import of
robustbench is all it takes; import robustbench through ``import_robustbench()`` only.
"""

from __future__ import annotations

import importlib
import sys
from types import ModuleType


def alias_autoattack() -> None:
    """Register ``pyautoattack`` (and its ``state`` module) under the name ``autoattack``."""
    if "autoattack" not in sys.modules:
        sys.modules["autoattack"] = importlib.import_module("pyautoattack")
    if "autoattack.state" not in sys.modules:
        sys.modules["autoattack.state"] = importlib.import_module("pyautoattack.state")


def import_robustbench() -> ModuleType:
    """``import robustbench`` after aliasing autoattack; returns the module."""
    alias_autoattack()
    return importlib.import_module("robustbench")
