"""Where things are: the repository, its configs and tools, and data that lives outside it (from the environment).

Every path a test reads is either inside the repository (relative to :data:`ROOT`) or named by an environment
variable; :func:`path_from_env` skips the test, naming the variable, when it is not set or names nothing.
"""

from __future__ import annotations

import importlib.util
import os
import sys
from types import ModuleType

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CONFIGS = os.path.join(ROOT, "configs")


def config_path(name: str) -> str:
    """``configs/<name>`` in this checkout."""
    return os.path.join(CONFIGS, name)


def load_tool(name: str) -> ModuleType:
    """Imports ``tools/<name>.py`` as a module, e.g. ``load_tool("train")``, ``load_tool("benchmarks/gpu_report")``
    (a tool's ``main(argv)`` is what its command line runs).

    As ``python tools/<name>.py`` does, the tool's folder is first on ``sys.path`` while it loads (a benchmark imports
    its sibling ``_bench_floor``). The module is registered in ``sys.modules`` (dataclasses look their module up
    there).
    """
    path = os.path.join(ROOT, "tools", f"{name}.py")
    spec = importlib.util.spec_from_file_location(f"tool_{name.replace('/', '_')}", path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    folder = os.path.dirname(path)
    sys.path.insert(0, folder)
    try:
        spec.loader.exec_module(module)
    finally:
        sys.path.remove(folder)
    return module


SHARED = os.path.join(os.path.dirname(ROOT), "shared")  # the project's shared folder, beside the checkout


def path_from_env(variable: str, what: str, kind: str = "dir", default: str = "") -> str:
    """The path in ``$variable``, else ``default`` (relative to the folder beside the checkout: ``shared/...``);
    skips the calling test, naming the variable and ``what``, when neither names an existing ``kind`` ("dir" or
    "file")."""
    path = os.environ.get(variable, "") or default
    exists = os.path.isdir(path) if kind == "dir" else os.path.isfile(path)
    if not path:
        pytest.skip(f"set {variable} to {what} to run this test")
    if not exists:
        pytest.skip(f"{variable}={path} is no {'folder' if kind == 'dir' else 'file'}; it must name {what}")
    return path
