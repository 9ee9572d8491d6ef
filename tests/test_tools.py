"""tools/: the user commands at its top, benchmarks and experiments in their folders, none touching ``sys.path``, all
runnable from any directory once the package is installed."""

from __future__ import annotations

import ast
import os
import subprocess
import sys

import pytest
from _repo import ROOT, config_path, load_tool

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


# Each user command with what it needs besides the config (CONFIG marks its place): a bad override is a run it
# cannot do (exit 1, one "error:" line, before any checkpoint, data or image is looked for); an option value it
# refuses is argparse's (2, with the usage line).
COMMAND_ARGS = {
    "train": ["CONFIG"],
    "eval": ["CONFIG", "--checkpoint", "missing.pth"],
    "infer": ["CONFIG", "missing.png", "--checkpoint", "missing.pth"],
    "visualize": ["CONFIG", "--image", "missing.png", "--out", "v.png", "--checkpoint", "missing.pth"],
    "export_onnx": ["CONFIG", "--out", "m.onnx", "--checkpoint", "missing.pth"],
    "export_torch": ["CONFIG", "--out", "m.pt2", "--checkpoint", "missing.pth"],
    "convert_checkpoint": ["missing.pth", "out.pth", "CONFIG"],
    "make_shapes": ["CONFIG"],
}
BAD_OPTIONS = {
    "infer": ["--score-threshold", "2"],
    "visualize": ["--top-k", "0"],
    "export_onnx": ["--opset", "17"],
}


def _argv(name: str, *extra: str) -> list[str]:
    return [config_path("shapes.yaml") if a == "CONFIG" else a for a in COMMAND_ARGS[name]] + list(extra)


@pytest.mark.parametrize("name", sorted(COMMAND_ARGS))
def test_every_command_reports_a_bad_override_with_exit_status_1(name: str, tmp_path, monkeypatch, capsys) -> None:
    monkeypatch.chdir(tmp_path)
    status = load_tool(name).main(_argv(name, "train.lr=fast"))
    err = capsys.readouterr().err
    assert status == 1 and err.startswith("error: ") and "'train.lr' expects a number" in err, err
    assert "missing" not in err and "usage:" not in err and os.listdir(tmp_path) == []


@pytest.mark.parametrize("name", sorted(BAD_OPTIONS))
def test_an_option_value_a_command_refuses_is_a_usage_error(name: str, tmp_path, monkeypatch, capsys) -> None:
    monkeypatch.chdir(tmp_path)
    with pytest.raises(SystemExit) as refused:
        load_tool(name).main(_argv(name, *BAD_OPTIONS[name]))
    err = capsys.readouterr().err
    assert refused.value.code == 2 and "usage:" in err and "missing" not in err and os.listdir(tmp_path) == []
