"""``train.ema_decay``: the moving average of the weights, what a checkpoint holds of it, and resuming it."""

from __future__ import annotations

import os

import pytest
import torch
from tiny_training import tiny_config
from torch import nn

from deformable.training import engine
from deformable.training.ema import build_ema, ema_updates
from models.checkpoint import CheckpointError, read_checkpoint
from models.loading import config_from_checkpoint, load_detector

pytestmark = pytest.mark.usefixtures("one_thread")


def test_the_average_follows_the_ramped_decay() -> None:
    layer = nn.Linear(2, 1, bias=False)
    ema = build_ema(layer, 0.5)
    values = [1.0, 3.0, 7.0, -1.0]
    expected = None
    for n, value in enumerate(values):
        with torch.no_grad():
            layer.weight.fill_(value)
        ema.update_parameters(layer)
        # The first step copies; the n-th (0-based) after it decays by min(0.5, (1 + n) / (10 + n)).
        d = min(0.5, (1 + n) / (10 + n))
        expected = value if expected is None else d * expected + (1 - d) * value
        torch.testing.assert_close(ema.module.weight, torch.full((1, 2), expected))
    assert ema_updates(ema) == len(values)
    assert not any(p.requires_grad for p in ema.parameters())


def test_off_and_bad_decays() -> None:
    assert build_ema(nn.Linear(2, 1), 0.0) is None
    for decay in (1.0, -0.1):
        with pytest.raises(ValueError, match=r"train.ema_decay must be in \[0, 1\)"):
            build_ema(nn.Linear(2, 1), decay)


EMA = ("train.ema_decay=0.9", "train.eval_every=0")


def test_an_ema_run_saves_the_average_as_the_model(shapes_root, tmp_path) -> None:
    out = str(tmp_path / "run")
    engine.fit(tiny_config(shapes_root, out, *EMA))
    ckpt = read_checkpoint(os.path.join(out, "checkpoint.pth"))
    assert ckpt.entries["ema_updates"] == 2  # one per optimiser step
    raw = ckpt.entries["training_weights"]
    assert set(raw) == set(ckpt.model)
    assert any(not torch.equal(raw[k], v) for k, v in ckpt.model.items())
    # Every tool loads the average into the plain detector, with the run's own config.
    model, _ = load_detector(config_from_checkpoint(ckpt), ckpt)
    for key, value in ckpt.model.items():
        assert torch.equal(model.state_dict()[key], value), key


def test_an_ema_run_resumes_exactly(shapes_root, tmp_path) -> None:
    straight, resumed = str(tmp_path / "straight"), str(tmp_path / "resumed")
    engine.fit(tiny_config(shapes_root, straight, "train.epochs=2", *EMA))
    engine.fit(tiny_config(shapes_root, resumed, "train.epochs=1", *EMA))
    engine.fit(tiny_config(shapes_root, resumed, "train.epochs=2", "train.resume=auto", *EMA))
    a, b = (read_checkpoint(os.path.join(out, "checkpoint.pth")) for out in (straight, resumed))
    assert a.entries["ema_updates"] == b.entries["ema_updates"] == 4
    for key, value in a.model.items():
        torch.testing.assert_close(b.model[key], value, msg=key)
    for key, value in a.entries["training_weights"].items():
        torch.testing.assert_close(b.entries["training_weights"][key], value, msg=key)


def test_resuming_needs_the_same_ema_setting(shapes_root, tmp_path) -> None:
    with_ema, without = str(tmp_path / "ema"), str(tmp_path / "plain")
    engine.fit(tiny_config(shapes_root, with_ema, *EMA))
    engine.fit(tiny_config(shapes_root, without, "train.eval_every=0"))
    off = r"train.ema_decay: the checkpoint was trained with 0.9, the config says 0.0 \(override: train.ema_decay=0.9\)"
    with pytest.raises(CheckpointError, match=off):
        engine.fit(tiny_config(shapes_root, with_ema, "train.epochs=2", "train.resume=auto", "train.eval_every=0"))
    on = r"train.ema_decay: the checkpoint was trained with 0.0, the config says 0.9 \(override: train.ema_decay=0.0\)"
    with pytest.raises(CheckpointError, match=on):
        engine.fit(tiny_config(shapes_root, without, "train.epochs=2", "train.resume=auto", *EMA))
    with pytest.raises(CheckpointError, match="trained with 0.9, the config says 0.5"):  # another decay, too
        engine.fit(tiny_config(shapes_root, with_ema, "train.epochs=2", "train.resume=auto", "train.ema_decay=0.5"))
