"""tools/gpu_check.sh and its helpers, without a GPU: the script's argument handling (the only way it is run here),
the memory floor of tools/benchmarks/_bench_floor.py on hand-counted bytes, and tools/benchmarks/gpu_report.py on
fixture files."""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from _repo import load_tool

ROOT = Path(__file__).resolve().parent.parent
SCRIPT = ROOT / "tools" / "gpu_check.sh"

floor = load_tool("benchmarks/_bench_floor")
report = load_tool("benchmarks/gpu_report")


def _script(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess:
    """Runs the script with arguments that make it stop before any step (it is never run further here)."""
    return subprocess.run(["bash", str(SCRIPT), *args], capture_output=True, text=True, env=env, timeout=30)


# --- the script's arguments ---------------------------------------------------------------------------------------


def test_script_parses():
    assert subprocess.run(["bash", "-n", str(SCRIPT)], capture_output=True).returncode == 0


@pytest.mark.skipif(shutil.which("shellcheck") is None, reason="shellcheck is not installed")
def test_script_is_shellcheck_clean():
    result = subprocess.run(["shellcheck", str(SCRIPT)], capture_output=True, text=True)
    assert result.returncode == 0, result.stdout


@pytest.mark.parametrize("args", [(), ("",), ("a", "b", "c")], ids=["none", "empty", "three"])
def test_wrong_argument_count_prints_usage_and_exits_2(args):
    result = _script(*args)
    assert result.returncode == 2
    assert "usage:" in result.stderr and "OUTDIR [WHEELDIR]" in result.stderr


def test_help_prints_usage_and_exits_0():
    result = _script("--help")
    assert result.returncode == 0 and "usage:" in result.stderr


def test_missing_wheeldir_is_a_clear_error(tmp_path):
    outdir = tmp_path / "out"
    result = _script(str(outdir), str(tmp_path / "no-such-wheels"))
    assert result.returncode == 2
    assert "WHEELDIR" in result.stderr and "does not exist" in result.stderr
    assert not outdir.exists()  # stopped before creating anything


def test_wheeldir_without_wheels_is_a_clear_error(tmp_path):
    (tmp_path / "wheels").mkdir()
    result = _script(str(tmp_path / "out"), str(tmp_path / "wheels"))
    assert result.returncode == 2 and "no .whl files" in result.stderr


def test_bad_budget_is_a_clear_error(tmp_path):
    result = _script(str(tmp_path / "out"), env=dict(os.environ, GPU_CHECK_BUDGET="ten"))
    assert result.returncode == 2 and "GPU_CHECK_BUDGET" in result.stderr


def test_nothing_in_ci_runs_the_script():
    assert "gpu_check" not in (ROOT / ".ci" / "run").read_text()
    for path in (ROOT / "tests").glob("*.py"):
        if path.name != Path(__file__).name:
            assert "gpu_check" not in path.read_text(), path


def test_script_writes_at_most_8_plainly_named_files():
    # Only 8 files come back from the device machine, each named with letters, digits, '.', '_' and '-'.
    names = set(re.findall(r"\$OUTDIR/([^\"\s]+)", SCRIPT.read_text()))
    assert names == {"report.md", "steps.tsv", "build.log", "tests.log", "bench.log", "bench_op.json",
                     "bench_detector.json", "train.log"}  # fmt: skip
    assert all(re.fullmatch(r"[A-Za-z0-9._-]+", name) for name in names)


# --- the memory floor ---------------------------------------------------------------------------------------------

# N=2, S=10 (levels 2x3 and 2x2), Lq=3, M=2, D=4, L=2, P=3: N*S*M*D = 160 value elements, N*Lq*M*L*P = 72 slots,
# N*Lq*M*D = 48 output elements.
SIZE = floor.OpSize(batch=2, spatial=10, queries=3, heads=2, channels=4, levels=2, points=3)
FP32 = {"value": 160 * 4, "sampling_locations": 72 * 2 * 4, "attention_weights": 72 * 4, "output": 48 * 4}
BF16 = {"value": 160 * 2, "sampling_locations": 72 * 2 * 4, "attention_weights": 72 * 4, "output": 48 * 2}


@pytest.mark.parametrize(("value_dtype", "expected"), [(torch.float32, FP32), (torch.bfloat16, BF16)], ids=str)
def test_tensor_bytes(value_dtype, expected):
    assert floor.tensor_bytes(SIZE, value_dtype, torch.float32) == expected


@pytest.mark.parametrize(
    ("value_dtype", "fwd", "fwd_bwd"),
    [
        # forward: value 640 + locations 576 + weights 288 + output 192; forward + backward: 3 x 1504 + 2 x 192
        (torch.float32, 1696, 4896),
        # bf16 value (320) and output (96), fp32 locations and weights: 3 x 1184 + 2 x 96
        (torch.bfloat16, 1280, 3744),
    ],
    ids=["float32", "bfloat16"],
)
def test_op_bytes(value_dtype, fwd, fwd_bwd):
    parts = floor.tensor_bytes(SIZE, value_dtype, torch.float32)
    assert floor.op_bytes(SIZE, value_dtype, torch.float32, backward=False) == fwd == sum(parts.values())
    assert floor.op_bytes(SIZE, value_dtype, torch.float32, backward=True) == fwd_bwd


def test_op_size_from_tensors():
    value = torch.empty(2, 10, 2, 4)
    locations = torch.empty(2, 3, 2, 2, 3, 2)
    assert floor.OpSize.of(value, locations) == SIZE


def test_floor_ms():
    assert floor.floor_ms(1696, 1e9) == pytest.approx(1.696e-3)
    assert floor.floor_ms(4_000_000_000, 4e12) == pytest.approx(1.0)
    with pytest.raises(ValueError, match="bandwidth must be positive"):
        floor.floor_ms(1, 0.0)


def test_benchmark_op_floor_fields_and_rows():
    bench = load_tool("benchmarks/benchmark_op")
    inputs = (torch.empty(2, 10, 2, 4, dtype=torch.bfloat16), None, None, torch.empty(2, 3, 2, 2, 3, 2), None)
    fields = bench.floor_fields(inputs, 1e9)
    assert fields["fwd_bytes"] == 1280 and fields["fwd_bwd_bytes"] == 3744
    assert fields["fwd_floor_ms"] == pytest.approx(1280e-6) and fields["fwd_bwd_floor_ms"] == pytest.approx(3744e-6)
    record = {"device": "cpu", "dtype": "float32", "shape": "encoder", "batch": 1, "locations": "realistic",
              "label": "native", "fwd_ms": 19.62, "fwd_bwd_ms": 85.86, "fwd_extra_mb": 46.1, "fwd_bwd_extra_mb": 138.1,
              "speedup_fwd": 46.6, "speedup_fwd_bwd": 25.4}  # fmt: skip
    # A CPU row reads as before the floor columns existed.
    expected = "| cpu | float32 | encoder | 1 | realistic | native | 19.62 | 85.86 | 46.1 | 138.1 | 46.6x | 25.4x |"
    assert bench.format_row(record, floor_columns=False) == expected
    assert bench.format_row(record, floor_columns=True) == expected + " - | - | - | - |"
    cuda = dict(record, device="cuda", fwd_ms=0.05, fwd_bwd_ms=0.3, fwd_floor_ms=0.0125, fwd_bwd_floor_ms=0.0375,
                fwd_x_floor=4.0, fwd_bwd_x_floor=8.0)  # fmt: skip
    assert bench.format_row(cuda, floor_columns=True).endswith("| 0.050 | 0.300 | 46.1 | 138.1 | 46.6x | 25.4x "
                                                                "| 12.5 | 4.0x | 37.5 | 8.0x |")  # fmt: skip


# --- the report ---------------------------------------------------------------------------------------------------


def _op_record(dtype: str, batch: int, path: str, fwd_x: float, fwd_bwd_x: float, label: str | None = None) -> dict:
    return {"device": "cuda", "dtype": dtype, "shape": "encoder", "batch": batch, "locations": "realistic",
            "path": path, "label": label or path, "fwd_ms": 0.1, "fwd_bwd_ms": 1.0, "fwd_floor_ms": 0.1 / fwd_x,
            "fwd_bwd_floor_ms": 1.0 / fwd_bwd_x, "fwd_x_floor": fwd_x, "fwd_bwd_x_floor": fwd_bwd_x,
            "speedup_fwd": None, "speedup_fwd_bwd": None}  # fmt: skip


def _det_record(backend: str, amp: str, phase: str, ms: float, label: str | None = None) -> dict:
    return {"device": "cuda", "backend": backend, "label": label or backend, "amp": amp, "phase": phase, "batch": 2,
            "height": 800, "width": 1333, "ms": ms, "shares": None}  # fmt: skip


STEPS = [("machine", "pass", "0", "4.2", "60"), ("build", "pass", "0", "95.0", "180"),
         ("tests_ops", "fail", "1", "40.5", "120"), ("bench_detector", "timeout", "124", "120.0", "120")]  # fmt: skip


def _write_fixtures(outdir: Path, op: list[dict] | None, det: list[dict] | None, steps=STEPS) -> Path:
    """The files gpu_check.sh leaves; returns the path of the demo's log.jsonl."""
    lines = ["info\tgpu\tNVIDIA H200, 143771 MiB, 580.159.04", "info\ttorch\t2.11.0+cu130", "info\tcuda\t13.0"]
    lines += ["\t".join(["step", *s, f"what {s[0]}"]) for s in steps]
    (outdir / "steps.tsv").write_text("\n".join(lines) + "\n")
    if op is not None:
        machine = {"build": "cpu;cuda archs=9.0", "copy_bandwidth_gbs": 4300.0}
        (outdir / "bench_op.json").write_text(json.dumps({"machine": machine, "records": op}))
    if det is not None:
        (outdir / "bench_detector.json").write_text(json.dumps({"torch": "2.11", "records": det}))
    (outdir / "tests.log").write_text(
        "### step tests_ops: python3 -m pytest -q tests/test_ops_cuda.py\n..F.\nFAILED tests/test_ops_cuda.py::test_x"
        " - AssertionError\n1 failed, 70 passed in 30.12s\n### step tests_marked: python3 -m pytest -m cuda\n"
        "no tests ran (400 deselected) in 3.00s\n"
    )
    train_log = outdir / "log.jsonl"
    records = [{"epoch": 0, "lr": 5e-4, "train_loss": 2.5, "time_s": 12.0},
               {"epoch": 1, "lr": 5e-4, "train_loss": 1.9, "AP": 0.123, "AP50": 0.301, "time_s": 11.0}]  # fmt: skip
    train_log.write_text("".join(json.dumps(r) + "\n" for r in records))
    return train_log


def _targets(text: str) -> dict[str, str]:
    """``{target: status}`` from the report's targets table."""
    rows = text.split("## Targets")[1].split("## Tests")[0].splitlines()
    cells = [row.split(" | ") for row in rows if row.startswith("| encoder") or row.startswith("| detector")]
    return {c[0].lstrip("| "): c[2].strip(" |*") for c in cells}


def test_report_targets_met_and_not_met(tmp_path):
    op = [_op_record("float32", 1, "native", 2.5, 4.0), _op_record("float32", 2, "native", 2.9, 4.9),
          _op_record("float32", 1, "pytorch", 90.0, 80.0), _op_record("bfloat16", 1, "native", 3.5, 4.0),
          _op_record("bfloat16", 2, "native", 2.0, 6.0)]  # fmt: skip
    det = [_det_record("native", "none", "train", 100.0), _det_record("transformers", "none", "train", 250.0),
           _det_record("native", "bf16", "train", 100.0), _det_record("transformers", "bf16", "train", 150.0),
           _det_record("pytorch", "none", "train", 180.0)]  # fmt: skip
    text = report.render(str(tmp_path), str(_write_fixtures(tmp_path, op, det)))
    assert _targets(text) == {
        "encoder forward within 3x of the memory floor, fp32": "met",
        "encoder forward within 3x of the memory floor, bf16": "not met",  # B=1: 3.5x
        "encoder forward + backward within 5x of the memory floor, fp32": "met",
        "encoder forward + backward within 5x of the memory floor, bf16": "not met",  # B=2: 6.0x
        "detector training step >= 2x transformers', fp32": "met",  # 2.5x
        "detector training step >= 2x transformers', bf16": "not met",  # 1.5x
    }
    assert "B=1 2.5x, B=2 2.9x" in text
    assert "| train | fp32 | 2x800x1333 | 100.0 | 180.0 | 250.0 | 1.80x | 2.50x |" in text
    assert "4300 GB/s" in text and "NVIDIA H200" in text and "2.11.0+cu130" in text


def test_report_targets_not_run(tmp_path):
    text = report.render(str(tmp_path), None)  # no files at all
    assert set(_targets(text).values()) == {"not run"} and len(_targets(text)) == 6
    assert "Overall: **FAIL (no steps recorded)**" in text
    assert "No `log.jsonl`" in text


def test_report_fallback_kernel_is_not_run(tmp_path):
    op = [_op_record("float32", 1, "native", 1.0, 1.0, label="native (fell back)")]
    det = [_det_record("native", "none", "train", 50.0, label="native (unavailable: PyTorch path)"),
           _det_record("transformers", "none", "train", 500.0)]  # fmt: skip
    text = report.render(str(tmp_path), str(_write_fixtures(tmp_path, op, det)))
    targets = _targets(text)
    assert targets["encoder forward within 3x of the memory floor, fp32"] == "not run"
    assert targets["detector training step >= 2x transformers', fp32"] == "not run"
    assert "native CUDA kernel not used" in text
    assert "50.0 (PyTorch path: no native kernel)" in text


def test_report_shows_failed_steps_tests_and_training(tmp_path):
    train_log = _write_fixtures(tmp_path, [], [])
    text = report.render(str(tmp_path), str(train_log))
    assert "Overall: **FAIL (tests_ops, bench_detector)**" in text
    assert "| tests_ops | **fail** (exit 1) | 40 | 120 | what tests_ops |" in text
    assert "| bench_detector | **timeout** | 120 | 120 |" in text
    assert "| build | pass | 95 | 180 |" in text
    assert "- tests_ops: 1 failed, 70 passed in 30.12s" in text
    assert "  - FAILED tests/test_ops_cuda.py::test_x - AssertionError" in text
    assert "- tests_marked: no tests ran (400 deselected) in 3.00s" in text
    assert "| 1 | 1.9000 | 0.123 | 0.301 | 11.0 |" in text


def test_report_passes_when_every_step_passed(tmp_path):
    steps = [("machine", "pass", "0", "4.0", "60"), ("train", "pass", "0", "41.0", "90")]
    train_log = _write_fixtures(tmp_path, [], [], steps=steps)
    text = report.render(str(tmp_path), str(train_log))
    assert "Overall: **PASS**, 45 s in all." in text
    assert "Wall time: 41 s wall, pass." in text


def test_report_main_writes_report_md(tmp_path):
    train_log = _write_fixtures(tmp_path, [], [])
    assert report.main([str(tmp_path), "--train-log", str(train_log)]) == 0
    assert (tmp_path / "report.md").read_text().startswith("# GPU check")
    with pytest.raises(SystemExit):
        report.main([str(tmp_path / "missing")])


def test_report_runs_as_a_command(tmp_path):
    _write_fixtures(tmp_path, [], [])
    command = [sys.executable, str(ROOT / "tools" / "benchmarks" / "gpu_report.py"), str(tmp_path)]
    result = subprocess.run(command, timeout=60)
    assert result.returncode == 0 and (tmp_path / "report.md").is_file()


COPE_LOG = """### step bench_op: python3 tools/benchmarks/benchmark_op.py --device cuda
| op table | not this one |
|---|---|
| 1 | 2 |
### step bench_cope: python3 tools/benchmarks/benchmark_cope.py --device cuda --batch 2
- GPU: NVIDIA H200 (CUDA 13.0)

device cuda, float32, batch 2, d_model 256, 8 heads x 4 points, 2 counting channels, op path native, median of 10
| shape | pass | linear ms | cope ms | ratio | linear peak MiB | cope peak MiB |
|---|---|---|---|---|---|---|
| encoder (Lq 22223, 2-d refs) | fwd | 1.2 | 1.9 | 1.58 | 310 | 402 |
### step bench_detector: python3 tools/benchmarks/benchmark_detector.py
| detector table | not this one either |
"""


def test_report_shows_the_cope_table_as_printed(tmp_path):
    (tmp_path / "bench.log").write_text(COPE_LOG)
    text = report.render(str(tmp_path), None)
    section = text.split("## CoPE offsets against linear")[1].split("## Detector")[0]
    assert "op path native, median of 10" in section
    assert "| encoder (Lq 22223, 2-d refs) | fwd | 1.2 | 1.9 | 1.58 | 310 | 402 |" in section
    assert "GPU: NVIDIA H200" not in section  # the machine lines are the report's own section
    assert "not this one" not in section  # the other steps' tables in bench.log


@pytest.mark.parametrize(
    "log", ["", COPE_LOG.split("| shape")[0] + "Traceback (most recent call last):\n"], ids=["no-log", "crashed"]
)
def test_report_without_cope_rows_says_so(tmp_path, log):
    if log:
        (tmp_path / "bench.log").write_text(log)
    section = report.render(str(tmp_path), None).split("## CoPE offsets against linear")[1].split("## Detector")[0]
    assert "No measurements (see bench.log, step bench_cope)." in section
