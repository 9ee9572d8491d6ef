"""How a run ends before its last epoch, through tools/train.py: diverged (NaN or inf predictions, loss or gradients)
with one error line naming the checkpoint kept and the overrides that help, and interrupted (Ctrl-C) with one line
saying how to continue it, exit status 130."""

from __future__ import annotations

import os

import pytest
import torch
from _repo import load_tool
from tiny_training import SHAPES_CONFIG, TINY_MODEL, tiny_overrides

from deformable.training import engine
from models import build_detector
from models.checkpoint import read_checkpoint
from models.config import load_config
from models.matcher import HungarianMatcher

pytestmark = pytest.mark.usefixtures("one_thread")

train_tool = load_tool("train")


def _main(*argv: str) -> int:
    """tools/train.py's main; a KeyboardInterrupt that leaves it fails the test instead of ending the session."""
    try:
        return train_tool.main(list(argv))
    except KeyboardInterrupt:
        pytest.fail("KeyboardInterrupt left tools/train.py")


def _train(shapes_root: str, run: str, *extra: str) -> int:
    return _main(SHAPES_CONFIG, *tiny_overrides(shapes_root, run, "train.eval_every=0", *extra))


def _error_lines(err: str) -> list[str]:
    return [line for line in err.splitlines() if line.startswith("error:")]


def test_the_matcher_names_what_is_not_finite() -> None:
    """scipy's linear_sum_assignment refuses a NaN cost as "matrix contains invalid numeric entries"."""
    matcher = HungarianMatcher()
    targets = [{"labels": torch.tensor([1]), "boxes": torch.tensor([[0.5, 0.5, 0.2, 0.2]])}]
    logits, boxes = torch.zeros(1, 3, 4), torch.full((1, 3, 4), 0.3)
    logits[0, 1, 1] = float("nan")  # the column of the target class: one that no target has is not matched on
    with pytest.raises(FloatingPointError, match=r"^the predictions hold NaN or inf \(pred_logits: 1 of 12 values\)"):
        matcher({"pred_logits": logits, "pred_boxes": boxes}, targets)
    targets[0]["boxes"][0, 0] = float("inf")
    with pytest.raises(FloatingPointError, match=r"predictions are finite \(the target boxes hold 1 NaN or inf"):
        matcher({"pred_logits": torch.zeros(1, 3, 4), "pred_boxes": boxes}, targets)


def test_a_run_that_diverges_ends_with_one_error_line(shapes_root, tmp_path, capsys) -> None:
    """The tester's case: learning rates of 1000 make the model NaN within the first epoch."""
    run = str(tmp_path / "run")
    assert _train(shapes_root, run, "train.lr=1000", "train.lr_backbone=1000") == 1
    err = capsys.readouterr().err
    assert "Traceback" not in err and "invalid numeric entries" not in err
    (line,) = _error_lines(err)
    assert line.startswith("error: training diverged at epoch 0 step ")
    assert f"{run} holds no checkpoint of it (epoch 0 was its first)" in line
    assert line.endswith("train it again with a lower train.lr (now 1000) and train.lr_backbone (now 1000)")


def test_a_diverged_run_keeps_its_last_checkpoint(shapes_root, tmp_path, monkeypatch, capsys) -> None:
    """NaN predictions at epoch 1 step 0: the error names the step, the checkpoint of epoch 0, and the overrides that
    may help (a lower rate in a new run; clipping and another precision on resuming, where they are off)."""
    run = str(tmp_path / "run")
    real, calls = engine._forward, []

    def forward(*args):
        outputs = real(*args)
        calls.append(1)
        return outputs if len(calls) <= 2 else {**outputs, "pred_logits": outputs["pred_logits"] * float("nan")}

    monkeypatch.setattr(engine, "_forward", forward)
    assert _train(shapes_root, run, "train.epochs=2", "train.clip_max_norm=0") == 1
    (line,) = _error_lines(capsys.readouterr().err)
    checkpoint = os.path.join(run, "checkpoint.pth")
    assert line == (
        "error: training diverged at epoch 1 step 0: the predictions hold NaN or inf (pred_logits: 40 of 40 values): "
        f"Hungarian matching cannot pair them with targets. Its last checkpoint, {checkpoint} (epoch 0), is kept. "
        "To go on, train a new run in another output_dir with a lower train.lr (now 0.0005) and train.lr_backbone "
        f"(now 0.0005) (a resumed run keeps the rates it was trained with; train.finetune={checkpoint} starts from "
        "its weights); or resume it with train.resume=auto train.clip_max_norm=0.1 (gradient clipping, the recipe's)"
    )
    assert read_checkpoint(checkpoint).entries["epoch"] == 0


def _step(model: torch.nn.Module, criterion) -> None:
    """One training step of ``model`` on a blank image with ``criterion`` (a function), as epoch 3."""
    criterion.train = lambda: None
    batch = (torch.zeros(1, 3, 64, 64), torch.zeros(1, 64, 64, dtype=torch.bool), [{}])
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    engine.train_one_epoch(model, criterion, [batch], optimizer, epoch=3, device=torch.device("cpu"))


def test_a_nan_loss_names_its_terms() -> None:
    def criterion(outputs, targets):
        term = outputs["pred_logits"].float().mean() * float("nan")
        return {"loss_ce": term, "loss_bbox": torch.tensor(0.5), "loss": term}

    with pytest.raises(FloatingPointError, match=r"^at epoch 3 step 0: the loss is nan \(loss_ce nan\)$"):
        _step(build_detector(load_config(SHAPES_CONFIG, TINY_MODEL)), criterion)


def test_nan_gradients_stop_the_step_before_it_spoils_the_weights() -> None:
    """A finite loss whose gradient is NaN (sqrt at 0): the optimiser step would turn every weight into NaN."""

    def criterion(outputs, targets):
        loss = (outputs["pred_logits"].float().sum() * 0).sqrt()
        return {"loss_ce": loss, "loss": loss}

    model = build_detector(load_config(SHAPES_CONFIG, TINY_MODEL))
    with pytest.raises(FloatingPointError, match=r"^at epoch 3 step 0: the gradient norm is nan though the loss is"):
        _step(model, criterion)
    assert all(torch.isfinite(p).all() for p in model.parameters())


def _interrupt_at(monkeypatch: pytest.MonkeyPatch, epoch: int) -> None:
    """Ctrl-C in the middle of training ``epoch`` (the epochs before train as usual)."""
    real = engine.train_one_epoch

    def train_one_epoch(*args, **kwargs):
        if kwargs["epoch"] == epoch:
            raise KeyboardInterrupt
        return real(*args, **kwargs)

    monkeypatch.setattr(engine, "train_one_epoch", train_one_epoch)


def test_ctrl_c_says_where_the_run_stands_and_how_to_continue(shapes_root, tmp_path, monkeypatch, capsys) -> None:
    run = str(tmp_path / "run")
    _interrupt_at(monkeypatch, 1)
    assert _train(shapes_root, run, "train.epochs=2") == 130
    err = capsys.readouterr().err
    assert "Traceback" not in err
    assert err.splitlines()[-1] == (
        f"interrupted: its last checkpoint is {run}/checkpoint.pth (epoch 0); train.resume=auto with "
        f"output_dir={run} continues it"
    )
    monkeypatch.undo()
    assert _train(shapes_root, run, "train.epochs=2", "train.resume=auto") == 0
    assert read_checkpoint(os.path.join(run, "checkpoint.pth")).entries["epoch"] == 1


def test_ctrl_c_before_the_first_checkpoint(shapes_root, tmp_path, monkeypatch, capsys) -> None:
    run = str(tmp_path / "run")
    _interrupt_at(monkeypatch, 0)
    assert _train(shapes_root, run) == 130
    assert capsys.readouterr().err.splitlines()[-1] == (
        f"interrupted before the run saved a checkpoint in {run}: the same command starts it again"
    )


def test_ctrl_c_under_torchrun_is_said_by_rank_0_only(tmp_path, monkeypatch, capsys) -> None:
    def fit(cfg):
        raise KeyboardInterrupt

    monkeypatch.setattr(train_tool, "fit", fit)
    monkeypatch.setenv("RANK", "1")
    assert _main(SHAPES_CONFIG, f"output_dir={tmp_path}") == 130
    assert capsys.readouterr().err == ""
    monkeypatch.setenv("RANK", "0")
    assert _main(SHAPES_CONFIG, f"output_dir={tmp_path}") == 130
    assert capsys.readouterr().err.startswith("interrupted before the run saved a checkpoint")
