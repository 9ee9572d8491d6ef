"""tools/: the user commands at its top, benchmarks and experiments in their folders, none touching ``sys.path``, all
runnable from any directory once the package is installed."""

from __future__ import annotations

import ast
import os
import subprocess
import sys

import pytest
from _repo import ROOT

TOOLS = os.path.join(ROOT, "tools")
USER_COMMANDS = {  # and the shell script of the GPU check, tested on its own
    "train.py", "eval.py", "infer.py", "visualize.py", "plot_log.py", "convert_checkpoint.py", "export_onnx.py",
    "export_torch.py", "make_shapes.py",
}  # fmt: skip


def tool_files() -> list[str]:
    return sorted(
        os.path.join(folder, name)
        for folder, dirs, names in os.walk(TOOLS)
        for name in names
        if name.endswith(".py") and "__pycache__" not in folder
    )


def test_the_top_of_tools_is_what_a_user_runs() -> None:
    top = {n for n in os.listdir(TOOLS) if n.endswith(".py")}
    assert top == USER_COMMANDS
    assert {d for d in os.listdir(TOOLS) if os.path.isdir(os.path.join(TOOLS, d)) and d != "__pycache__"} == {
        "benchmarks",
        "experiments",
    }


@pytest.mark.parametrize("path", tool_files(), ids=lambda p: os.path.relpath(p, TOOLS))
def test_no_tool_touches_sys_path(path: str) -> None:
    with open(path, encoding="utf-8") as f:
        tree = ast.parse(f.read(), filename=path)
    touches = [
        node.lineno
        for node in ast.walk(tree)
        if isinstance(node, ast.Attribute) and node.attr == "path" and getattr(node.value, "id", "") == "sys"
    ]
    assert not touches, f"{os.path.relpath(path, ROOT)} uses sys.path on line(s) {touches}"


@pytest.mark.parametrize("tool", ["train.py", "benchmarks/benchmark_op.py", "experiments/cope_figure.py"])
def test_a_tool_runs_from_another_directory(tool: str, tmp_path) -> None:
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    result = subprocess.run(
        [sys.executable, os.path.join(TOOLS, tool), "--help"], cwd=tmp_path, env=env, capture_output=True, text=True
    )
    assert result.returncode == 0, result.stderr[-2000:]
    assert result.stdout.startswith("usage: ")
