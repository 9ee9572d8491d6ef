"""Training with the training-only queries (denoising, query groups, IoU-aware loss) on a tiny model and data set:
the checkpoint is a plain detector, resume restores the aids exactly, AMP and CoPE offsets train, torchrun works."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest
import torch
from _repo import ROOT, load_tool
from tiny_training import SHAPES_CONFIG, tiny_config, tiny_overrides

from deformable.training import engine, resume
from deformable.training.build import build_trainee
from deformable.training.optim import build_lr_scheduler, build_optimizer
from models import build_detector, config_from_checkpoint, load_detector
from models.checkpoint import CheckpointError, read_checkpoint, save_checkpoint

pytestmark = pytest.mark.usefixtures("one_thread")

OPTIONS = ["training_queries.dn_groups=2", "training_queries.query_groups=2", "loss.iou_aware=true"]
QUICK = ["train.eval_every=0", "data.val_size=48", "data.val_max_size=64"]

train_tool = load_tool("train")


@pytest.fixture(scope="module")
def trained(shapes_root, tmp_path_factory) -> str:
    """A 1-epoch, 2-iteration run through tools/train.py with every option on."""
    out = str(tmp_path_factory.mktemp("run"))
    assert train_tool.main([SHAPES_CONFIG, *tiny_overrides(shapes_root, out, *OPTIONS)]) == 0
    return out


def test_checkpoint_trained_with_the_options_is_a_plain_detector(trained, shapes_root) -> None:
    checkpoint = read_checkpoint(os.path.join(trained, "checkpoint.pth"))
    plain_cfg = tiny_config(shapes_root, trained)  # the options off: the detector a user loads
    assert set(checkpoint.model) == set(build_detector(plain_cfg).state_dict())
    aids = checkpoint.entries["query_aids"]
    assert {key.split(".")[0] for key in aids} == {"label_embed", "box_pos", "group_embed", "group_reference_points"}
    plain, _ = load_detector(plain_cfg, checkpoint)  # strict
    own, _ = load_detector(config_from_checkpoint(checkpoint), checkpoint)  # its own config, options included
    images = torch.rand(1, 3, 64, 64)
    with torch.no_grad():
        a, b = plain(images), own(images)
    assert "extra_outputs" not in a and torch.equal(a["pred_boxes"], b["pred_boxes"])
    record_keys = open(os.path.join(trained, "log.jsonl")).read()
    assert all(f'"train_{name}"' in record_keys for name in ("loss_ce_dn", "loss_bbox_g1", "loss_giou_dn_0"))


def test_resume_restores_the_aids_exactly(shapes_root, tmp_path) -> None:
    straight, resumed = str(tmp_path / "straight"), str(tmp_path / "resumed")
    engine.fit(tiny_config(shapes_root, straight, *OPTIONS, *QUICK, "train.epochs=2"))
    engine.fit(tiny_config(shapes_root, resumed, *OPTIONS, *QUICK, "train.epochs=1"))
    engine.fit(tiny_config(shapes_root, resumed, *OPTIONS, *QUICK, "train.epochs=2", "train.resume=auto"))
    a, b = (read_checkpoint(os.path.join(out, "checkpoint.pth")) for out in (straight, resumed))
    assert a.entries["epoch"] == b.entries["epoch"] == 1
    for key, value in a.entries["query_aids"].items():
        torch.testing.assert_close(b.entries["query_aids"][key], value, msg=key)
    for key, value in a.model.items():
        torch.testing.assert_close(b.model[key], value, msg=key)


def _trainee_state(cfg, tmp_path) -> tuple[str, dict]:
    """A checkpoint of one optimiser step of the detector with its aids, and the aids' state saved."""
    trainee = build_trainee(cfg, build_detector(cfg))
    optimizer = build_optimizer(trainee, cfg.train)
    scheduler = build_lr_scheduler(optimizer, cfg.train)
    sum(p.sum() for p in trainee.parameters() if p.requires_grad).backward()
    optimizer.step()
    state = resume.training_state(trainee.detector, optimizer, scheduler, None, 0, {}, [], aids=trainee.aids)
    path = str(tmp_path / "c.pth")
    save_checkpoint(state, path)
    return path, {k: v.clone() for k, v in trainee.aids.state_dict().items()}


def test_restore_puts_back_the_aids_and_refuses_other_options(shapes_root, tmp_path) -> None:
    cfg = tiny_config(shapes_root, str(tmp_path), *OPTIONS)
    path, saved = _trainee_state(cfg, tmp_path)
    fresh = build_trainee(cfg, build_detector(cfg))
    optimizer = build_optimizer(fresh, cfg.train)
    scheduler = build_lr_scheduler(optimizer, cfg.train)
    resume.restore_training_state(read_checkpoint(path), fresh.detector, optimizer, scheduler, None, 0, fresh.aids)
    for key, value in saved.items():
        assert torch.equal(fresh.aids.state_dict()[key], value), key

    plain_cfg = tiny_config(shapes_root, str(tmp_path))
    plain = build_trainee(plain_cfg, build_detector(plain_cfg))
    assert plain.aids is None
    optimizer = build_optimizer(plain, plain_cfg.train)
    scheduler = build_lr_scheduler(optimizer, plain_cfg.train)
    with pytest.raises(CheckpointError, match="training_queries"):
        resume.restore_training_state(read_checkpoint(path), plain.detector, optimizer, scheduler, None, 0, None)
    state = torch.load(path, weights_only=False)
    del state["query_aids"]
    save_checkpoint(state, path)
    fresh = build_trainee(cfg, build_detector(cfg))
    optimizer = build_optimizer(fresh, cfg.train)
    scheduler = build_lr_scheduler(optimizer, cfg.train)
    with pytest.raises(CheckpointError, match="no 'query_aids'"):
        resume.restore_training_state(read_checkpoint(path), fresh.detector, optimizer, scheduler, None, 0, fresh.aids)


@pytest.mark.parametrize(
    "extra",
    [["train.amp=bf16"], ["model.dec_offset_mode=cope", "model.with_box_refine=true"]],
    ids=["amp_bf16", "cope"],
)
def test_a_training_step_with_the_options(shapes_root, tmp_path, extra) -> None:
    out = str(tmp_path / "run")
    engine.fit(tiny_config(shapes_root, out, *OPTIONS, *QUICK, *extra, "train.max_iters_per_epoch=1"))
    checkpoint = read_checkpoint(os.path.join(out, "checkpoint.pth"))
    assert "query_aids" in checkpoint.entries
    assert all(torch.isfinite(v).all() for v in checkpoint.model.values() if v.is_floating_point())


@pytest.mark.slow
@pytest.mark.distributed
def test_torchrun_two_cpu_processes_with_the_options(tmp_path) -> None:
    """Denoising makes as many queries as the rank's largest image has targets, so the ranks' graphs differ; the
    detector and the aids must still end equal on both ranks."""
    shapes_root, out, params = str(tmp_path / "shapes"), str(tmp_path / "run"), tmp_path / "params"
    params.mkdir()
    overrides = tiny_overrides(shapes_root, out, *OPTIONS, *QUICK, "train.epochs=1", "train.max_iters_per_epoch=2")
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2"]
    command += [os.path.join(ROOT, "tests", "ddp_worker.py"), str(params), SHAPES_CONFIG, *overrides]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    result = subprocess.run(command, cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    ranks = [torch.load(params / f"rank{r}.pth", weights_only=True) for r in range(2)]
    checkpoint = read_checkpoint(os.path.join(out, "checkpoint.pth"))
    assert any(key.startswith("aids.") for key in ranks[0])
    for key, value in ranks[0].items():
        assert torch.equal(ranks[1][key], value), key
        saved = checkpoint.model if key.startswith("detector.") else checkpoint.entries["query_aids"]
        assert torch.equal(saved[key.split(".", 1)[1]], value), key
