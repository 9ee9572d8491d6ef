"""deformable.benchmarking: warm-up and timed calls, the statistics of a Timing, the machine description."""

from __future__ import annotations

import pytest
import torch
from _repo import config_path, load_tool

from deformable.benchmarking import Timing, machine_info, machine_lines, set_threads, time_calls, time_once


def test_time_calls_warms_up_then_times_each_call() -> None:
    calls, flushes = [], []
    timing = time_calls(lambda: calls.append(len(flushes)), iters=4, warmup=2, before=lambda: flushes.append(1))
    assert len(calls) == 6 and timing.iters == 4 and timing.warmup == 2 and timing.timer == "perf_counter"
    assert calls == [0, 0, 1, 2, 3, 4]  # ``before`` runs before each timed call only
    assert all(t >= 0 for t in timing.times_ms)


def test_timing_statistics() -> None:
    timing = Timing(times_ms=(4.0, 1.0, 3.0, 2.0, 10.0), warmup=0, timer="perf_counter")
    assert (timing.median_ms, timing.mean_ms, timing.spread_ms) == (3.0, 4.0, (1.0, 10.0))
    assert timing.percentile_ms(0.9) == 10.0 and timing.percentile_ms(0.0) == 1.0
    assert Timing((1.0, 2.0), 0, "perf_counter").median_ms == 1.5


def test_bad_counts_are_refused() -> None:
    with pytest.raises(ValueError, match="iters >= 1"):
        time_calls(lambda: None, iters=0)
    with pytest.raises(ValueError, match="warmup >= 0"):
        time_calls(lambda: None, iters=1, warmup=-1)


def test_time_once_and_threads() -> None:
    assert time_once(lambda: None) >= 0
    threads = torch.get_num_threads()
    try:
        assert set_threads(1) == 1
        assert set_threads(0) == 1  # 0 or None: leave torch's setting alone
    finally:
        torch.set_num_threads(threads)


def test_machine_description() -> None:
    info = machine_info(["cpu"])
    assert set(info) == {"cpu", "logical_cores", "threads", "gpu", "torch", "cuda", "build", "command"}
    assert info["gpu"] is None and info["threads"] == torch.get_num_threads() and info["torch"] == torch.__version__
    lines = machine_lines(info)
    assert lines[0].startswith("- CPU: ") and f"{info['threads']} torch threads" in lines[0]
    assert lines[-2].startswith(f"- torch {torch.__version__}, deformable._C built for: ")
    assert lines[-1].startswith("- command: `")


def test_benchmark_detector_finds_a_config_by_name_and_names_a_missing_one(capsys) -> None:
    tool = load_tool("benchmarks/benchmark_detector")
    assert tool._config_path("shapes.yaml") == config_path("shapes.yaml")  # a bare name: the checkout's configs/
    with pytest.raises(SystemExit, match=r"error: --config nope.yaml: config file not found: .*configs/nope.yaml"):
        tool.main(["--config", "nope.yaml"])
    assert capsys.readouterr().out == ""  # said before any table


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["--paths", "eagr"], "--paths: unknown ['eagr']; choose from eager, compile, onnx"),
        (["--cases", "shape"], "--cases: unknown ['shape']; choose from "),
        (["--devices", "gpu"], "--devices: unknown ['gpu']; choose from cpu, cuda"),
        (["--iters", "0"], "--iters and --threads must be at least 1"),
    ],
)
def test_benchmark_deploy_names_a_bad_argument_before_any_output(capsys, argv: list[str], message: str) -> None:
    tool = load_tool("benchmarks/benchmark_deploy")
    with pytest.raises(SystemExit) as caught:
        tool.main(argv)
    out, err = capsys.readouterr()
    assert caught.value.code == 2 and message in err and out == ""
