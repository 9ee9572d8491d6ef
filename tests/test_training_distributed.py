"""Two processes on the CPU under torchrun (gloo): identical parameters on every rank, files from rank 0 only."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from contextlib import ExitStack

import pytest
import torch
from _repo import ROOT
from tiny_training import SHAPES_CONFIG, tiny_overrides

from deformable.data.loader import ShardedBatches
from deformable.training import distributed
from deformable.training.build import prepare_output_dir
from deformable.training.distributed import DistEnv
from models.checkpoint import read_checkpoint
from models.config import Config


@pytest.mark.slow
@pytest.mark.distributed
@pytest.mark.parametrize("ema_decay", [0.0, 0.9])
def test_torchrun_two_cpu_processes(tmp_path, ema_decay) -> None:
    data_root, out, params = str(tmp_path / "shapes"), str(tmp_path / "run"), tmp_path / "params"
    params.mkdir()
    overrides = tiny_overrides(
        data_root,
        out,
        "train.epochs=2",
        "train.max_iters_per_epoch=0",
        "train.eval_every=0",
        f"train.ema_decay={ema_decay}",
    )
    command = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--standalone",
        "--nproc_per_node=2",
        os.path.join(ROOT, "tests", "ddp_worker.py"),
        str(params),
        SHAPES_CONFIG,
        *overrides,
    ]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    result = subprocess.run(command, cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]

    ranks = [torch.load(params / f"rank{r}.pth", weights_only=True) for r in range(2)]
    state = read_checkpoint(os.path.join(out, "checkpoint.pth"))
    assert state.entries["epoch"] == 1 and len(state.entries["rng"]) == 2
    trained = state.model if ema_decay == 0 else state.entries["training_weights"]
    for key, value in ranks[0].items():
        assert torch.equal(ranks[1][key], value), key
        assert torch.equal(trained[key.removeprefix("detector.")], value), key
    if ema_decay > 0:  # every rank averages the same weights; the checkpoint's model is that average
        averages = [torch.load(params / f"ema{r}.pth", weights_only=True) for r in range(2)]
        assert state.entries["ema_updates"] == 4
        for key, value in averages[0].items():
            assert torch.equal(averages[1][key], value), key
            assert torch.equal(state.model[key], value), key
    # 8 training images, 2 processes x batch 2: 2 steps per epoch and process, Adam counts 2 epochs x 2 steps
    assert {int(s["step"]) for s in state.entries["optimizer"]["state"].values()} == {4}
    assert sorted(os.listdir(out)) == ["checkpoint.pth", "checkpoint_best.pth", "config.yaml", "log.jsonl"]
    with open(os.path.join(out, "log.jsonl")) as f:
        records = [json.loads(line) for line in f]
    assert [r["epoch"] for r in records] == [0, 1] and "AP" in records[-1]
    assert result.stdout.count("validation AP") == 1  # printed by rank 0 only


@pytest.mark.parametrize(
    ("size", "batch_size", "world_size"), [(15, 2, 2), (16, 4, 3), (3, 2, 4), (0, 2, 2), (7, 1, 2)]
)
def test_validation_shards_keep_the_single_process_batches(size: int, batch_size: int, world_size: int) -> None:
    """Batching pads an image with its batch's neighbours, which moves its detections slightly: every process
    count must batch the same images together, each image once, for the metrics not to depend on it."""
    single = list(ShardedBatches(size, batch_size, rank=0, world_size=1))
    assert single == [list(range(i, min(i + batch_size, size))) for i in range(0, size, batch_size)]
    shards = [list(ShardedBatches(size, batch_size, rank, world_size)) for rank in range(world_size)]
    assert sorted(batch for shard in shards for batch in shard) == single
    assert [len(ShardedBatches(size, batch_size, r, world_size)) for r in range(world_size)] == list(map(len, shards))


def _reduce_on_rank(rank: int, init_file: str, values: list[dict], results: str) -> None:
    torch.distributed.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=len(values))
    try:
        torch.save(distributed.reduce_mean(values[rank], torch.device("cpu")), os.path.join(results, f"{rank}.pth"))
    finally:
        torch.distributed.destroy_process_group()


@pytest.mark.distributed
def test_epoch_means_of_processes_with_different_loss_terms_are_reduced(tmp_path) -> None:
    """A process whose batches held no box has no denoising loss terms: its means count 0 for them (as a step
    without them counts in one process), not a collective whose sizes differ between processes."""
    values = [{"loss": 1.0, "loss_bbox_dn": 0.5, "grad_norm": 2.0}, {"loss": 3.0, "grad_norm": 4.0}]
    torch.multiprocessing.spawn(
        _reduce_on_rank, args=(str(tmp_path / "init"), values, str(tmp_path)), nprocs=2, join=True
    )
    for rank in range(2):
        reduced = torch.load(tmp_path / f"{rank}.pth", weights_only=True)
        assert reduced == {"grad_norm": 3.0, "loss": 2.0, "loss_bbox_dn": 0.25}


def _prepare_on_rank(rank: int, init_file: str, output_dir: str, results: str) -> None:
    torch.distributed.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=2)
    cfg = Config()
    cfg.output_dir = output_dir
    try:
        with ExitStack() as held:
            prepare_output_dir(cfg, DistEnv(rank, 2, rank, torch.device("cpu")), held)
        outcome = "ok"
    except Exception as exc:  # noqa: BLE001 - the test compares what each rank raised
        outcome = f"{type(exc).__name__}: {exc}"
    finally:
        torch.distributed.destroy_process_group()
    with open(os.path.join(results, f"{rank}.txt"), "w") as f:
        f.write(outcome)


@pytest.mark.distributed
def test_an_output_dir_that_rank_0_cannot_make_stops_every_rank_with_its_message(tmp_path) -> None:
    """Rank 0 alone makes output_dir: when it cannot, the other ranks raise the same error rather than failing at
    their next collective on the connection rank 0 closed."""
    output_dir = tmp_path / "a_file"
    output_dir.write_bytes(b"x")
    torch.multiprocessing.spawn(
        _prepare_on_rank, args=(str(tmp_path / "init"), str(output_dir), str(tmp_path)), nprocs=2, join=True
    )
    message = f"FolderError: output_dir {output_dir} is a file, not a folder"
    assert [(tmp_path / f"{rank}.txt").read_text() for rank in range(2)] == [message, message]
