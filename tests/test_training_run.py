"""End to end on a tiny model and data set: train, checkpoint, log, resume, finetune, interrupted saves, eval."""

from __future__ import annotations

import json
import os

import pytest
import torch
import yaml
from _repo import load_tool
from tiny_training import tiny_config, tiny_overrides

from deformable.data import DatasetError
from deformable.data.coco_eval import STAT_NAMES
from deformable.training import engine, resume
from deformable.training.optim import build_lr_scheduler, build_optimizer
from models import build_detector, checkpoint
from models.checkpoint import CheckpointError, read_checkpoint, save_checkpoint
from models.config import ConfigError, config_to_dict, load_config
from models.files import TMP_PREFIX

pytestmark = pytest.mark.usefixtures("one_thread")

train_tool = load_tool("train")
eval_tool = load_tool("eval")


@pytest.fixture(scope="module")
def trained(shapes_root, tmp_path_factory) -> str:
    """Output folder of a 1-epoch, 2-iteration run through tools/train.py."""
    out = str(tmp_path_factory.mktemp("run"))
    assert train_tool.main([os.path.join("configs", "shapes.yaml"), *tiny_overrides(shapes_root, out)]) == 0
    return out


def _log(out: str) -> list[dict]:
    with open(os.path.join(out, "log.jsonl")) as f:
        return [json.loads(line) for line in f]


def test_train_writes_checkpoint_config_and_log(trained, shapes_root, capsys) -> None:
    assert sorted(os.listdir(shapes_root)) == [".deformable-synthetic", "annotations", "train2017", "val2017"]
    state = torch.load(os.path.join(trained, "checkpoint.pth"), map_location="cpu", weights_only=True)
    assert {"model", "optimizer", "lr_scheduler", "epoch", "config", "rng"} <= set(state)
    assert state["epoch"] == 0
    cfg = tiny_config(shapes_root, trained)
    assert state["config"] == config_to_dict(cfg)
    with open(os.path.join(trained, "config.yaml")) as f:
        assert yaml.safe_load(f) == config_to_dict(cfg)
    assert load_config(os.path.join(trained, "config.yaml")) == cfg
    (record,) = _log(trained)
    assert record["epoch"] == 0 and record["lr"] == pytest.approx(cfg.train.lr)
    assert all(key in record for key in ("train_loss", "train_loss_ce", "train_loss_bbox", "train_loss_giou"))
    assert all(0.0 <= record[name] <= 1.0 or record[name] == -1.0 for name in STAT_NAMES)
    assert [name for name in os.listdir(trained) if name.startswith(".")] == []


def test_param_groups_follow_the_recipe(shapes_root, tmp_path) -> None:
    cfg = tiny_config(shapes_root, str(tmp_path))
    optimizer = build_optimizer(build_detector(cfg), cfg.train)
    lrs = {group["name"]: group["lr"] for group in optimizer.param_groups}
    assert lrs == {"default": cfg.train.lr, "backbone": cfg.train.lr_backbone, "linear_proj": cfg.train.lr * 0.1}
    assert all(group["weight_decay"] == cfg.train.weight_decay for group in optimizer.param_groups)


def test_resume_continues_like_an_uninterrupted_run(shapes_root, tmp_path) -> None:
    straight, resumed = str(tmp_path / "straight"), str(tmp_path / "resumed")
    engine.fit(tiny_config(shapes_root, straight, "train.epochs=2", "train.checkpoint_every=1", "train.eval_every=0"))
    engine.fit(tiny_config(shapes_root, resumed, "train.epochs=1", "train.eval_every=0"))
    first = read_checkpoint(os.path.join(resumed, "checkpoint.pth"))
    engine.fit(tiny_config(shapes_root, resumed, "train.epochs=2", "train.eval_every=0", "train.resume=auto"))
    a, b = (read_checkpoint(os.path.join(out, "checkpoint.pth")) for out in (straight, resumed))
    assert a.entries["epoch"] == b.entries["epoch"] == 1 and first.entries["epoch"] == 0
    for key, value in a.model.items():
        torch.testing.assert_close(b.model[key], value, msg=key)
    optimizers = (a.entries["optimizer"]["state"], b.entries["optimizer"]["state"])
    for (i, sa), (j, sb) in zip(*(o.items() for o in optimizers), strict=True):
        assert i == j and sa["step"] == sb["step"] == 4
        torch.testing.assert_close(sa["exp_avg"], sb["exp_avg"])
    assert [r["epoch"] for r in _log(resumed)] == [0, 1]
    assert sorted(f for f in os.listdir(straight) if f.startswith("checkpoint")) == [
        "checkpoint.pth",
        "checkpoint_0000.pth",
        "checkpoint_0001.pth",
        "checkpoint_best.pth",  # the last epoch, the only one evaluated
    ]


def test_resume_continues_like_an_uninterrupted_run_with_evaluations(shapes_root, tmp_path) -> None:
    """The checkpoint is written before each evaluation, so evaluation must leave the state a run resumes alone."""
    straight, resumed = str(tmp_path / "straight"), str(tmp_path / "resumed")
    engine.fit(tiny_config(shapes_root, straight, "train.epochs=2", "train.eval_every=1"))
    engine.fit(tiny_config(shapes_root, resumed, "train.epochs=1", "train.eval_every=1"))
    engine.fit(tiny_config(shapes_root, resumed, "train.epochs=2", "train.eval_every=1", "train.resume=auto"))
    a, b = (read_checkpoint(os.path.join(out, "checkpoint.pth")) for out in (straight, resumed))
    for key, value in a.model.items():
        torch.testing.assert_close(b.model[key], value, msg=key)
    assert [r["AP"] for r in _log(resumed)] == [r["AP"] for r in _log(straight)]


def test_a_failed_evaluation_keeps_the_trained_epoch(shapes_root, tmp_path, monkeypatch) -> None:
    out = str(tmp_path / "run")

    def unreadable(*args, **kwargs):
        raise DatasetError("cannot read image v1.jpg (image id 2): image file is truncated")

    monkeypatch.setattr(engine, "evaluate", unreadable)
    with pytest.raises(DatasetError, match="v1.jpg"):
        engine.fit(tiny_config(shapes_root, out, "train.epochs=2", "train.eval_every=2", "train.checkpoint_every=1"))
    monkeypatch.undo()
    assert read_checkpoint(os.path.join(out, "checkpoint.pth")).entries["epoch"] == 1  # both epochs trained are kept
    assert [r["epoch"] for r in _log(out)] == [0]  # epoch 1's line waits for its evaluation
    metrics = engine.fit(tiny_config(shapes_root, out, "train.epochs=2", "train.eval_every=2", "train.resume=auto"))
    assert set(metrics) >= {"AP", "AP50"}  # the finished run is evaluated on resuming


def test_restore_puts_back_the_optimizer_state(shapes_root, tmp_path) -> None:
    cfg = tiny_config(shapes_root, str(tmp_path))
    model = build_detector(cfg)
    optimizer = build_optimizer(model, cfg.train)
    scheduler = build_lr_scheduler(optimizer, cfg.train)
    sum(p.sum() for p in model.parameters() if p.requires_grad).backward()
    optimizer.step()
    scheduler.step()
    path = str(tmp_path / "c.pth")
    rng = [resume.rng_state()]
    save_checkpoint(resume.training_state(model, optimizer, scheduler, None, 6, {}, rng), path)
    expected = torch.rand(3)
    fresh = build_detector(cfg)
    fresh_optimizer = build_optimizer(fresh, cfg.train)
    fresh_scheduler = build_lr_scheduler(fresh_optimizer, cfg.train)
    start = resume.restore_training_state(read_checkpoint(path), fresh, fresh_optimizer, fresh_scheduler, None, 0)
    assert start == 7 and fresh_scheduler.last_epoch == 1
    assert torch.equal(torch.rand(3), expected)  # the RNG continues where it was saved
    saved, restored = optimizer.state_dict(), fresh_optimizer.state_dict()
    for key, state in saved["state"].items():
        torch.testing.assert_close(restored["state"][key]["exp_avg_sq"], state["exp_avg_sq"], rtol=0, atol=0)


def test_interrupted_save_leaves_the_previous_checkpoint(tmp_path, monkeypatch) -> None:
    path = str(tmp_path / "checkpoint.pth")
    save_checkpoint({"model": {"w": torch.ones(3)}, "epoch": 0}, path)
    real_save = torch.save

    def torn_save(obj, f, *args, **kwargs):
        real_save(obj, f, *args, **kwargs)
        f.seek(0)
        f.truncate(20)  # half a file on disk, then the "crash"
        raise KeyboardInterrupt

    monkeypatch.setattr(checkpoint.torch, "save", torn_save)
    with pytest.raises(KeyboardInterrupt):
        save_checkpoint({"model": {"w": torch.zeros(3)}, "epoch": 1}, path)
    monkeypatch.undo()
    state = read_checkpoint(path)
    assert state.entries["epoch"] == 0 and torch.equal(state.model["w"], torch.ones(3))
    assert os.listdir(tmp_path) == ["checkpoint.pth"]


def test_run_killed_while_saving_resumes_to_a_valid_model(shapes_root, tmp_path, monkeypatch) -> None:
    out = str(tmp_path / "run")
    calls = {"n": 0}
    real_save = checkpoint.save_checkpoint

    def dies_on_second_save(state, path):
        calls["n"] += 1
        if calls["n"] == 2:
            with open(os.path.join(out, TMP_PREFIX + "checkpoint.pth.x"), "wb") as f:
                f.write(b"torn")  # what a SIGKILL during the write leaves behind
            raise KeyboardInterrupt
        real_save(state, path)

    monkeypatch.setattr(engine, "save_checkpoint", dies_on_second_save)
    with pytest.raises(KeyboardInterrupt):
        engine.fit(tiny_config(shapes_root, out, "train.epochs=2", "train.eval_every=0"))
    monkeypatch.undo()
    assert read_checkpoint(os.path.join(out, "checkpoint.pth")).entries["epoch"] == 0
    with open(os.path.join(out, "log.jsonl"), "a") as f:
        f.write('{"epoch": 1, "lr"')  # a log line cut short by the kill
    engine.fit(tiny_config(shapes_root, out, "train.epochs=2", "train.eval_every=0", "train.resume=auto"))
    assert read_checkpoint(os.path.join(out, "checkpoint.pth")).entries["epoch"] == 1
    assert [r["epoch"] for r in _log(out)] == [0, 1]
    assert not [name for name in os.listdir(out) if name.startswith(".")]


def test_finetune_from_another_class_count(trained, shapes_root, tmp_path, caplog) -> None:
    ckpt = os.path.join(trained, "checkpoint.pth")
    out = str(tmp_path / "ft")
    engine.fit(tiny_config(shapes_root, out, "model.num_classes=7", f"train.finetune={ckpt}", "train.eval_every=0"))
    assert "class_embed" in caplog.text  # models.load_checkpoint reports the re-initialised heads
    state = read_checkpoint(os.path.join(out, "checkpoint.pth"))
    assert state.model["class_embed.0.weight"].shape[0] == 7


def test_eval_tool_writes_metrics_and_coco_results(trained, shapes_root, capsys) -> None:
    ckpt = os.path.join(trained, "checkpoint.pth")
    overrides = tiny_overrides(shapes_root, trained)
    assert eval_tool.main([os.path.join("configs", "shapes.yaml"), "--checkpoint", ckpt, *overrides]) == 0
    printed = capsys.readouterr().out
    assert printed.count("Average Precision") == 6 and printed.count("Average Recall") == 6
    assert "| class | AP | AP50 |" in printed and "| (any class) |" in printed
    with open(os.path.join(trained, "eval.json")) as f:
        metrics = json.load(f)
    assert set(STAT_NAMES) <= set(metrics)
    with open(os.path.join(shapes_root, "annotations", "instances_val2017.json")) as f:
        names = [c["name"] for c in sorted(json.load(f)["categories"], key=lambda c: c["id"])]
    assert list(metrics["per_class"]) == [*names, "(any class)"]
    for name, values in metrics["per_class"].items():
        assert set(values) == {"AP", "AP50"} and -1 <= values["AP"] <= values["AP50"] <= 1, name
    with open(os.path.join(trained, "detections_val2017.json")) as f:
        detections = json.load(f)
    with open(os.path.join(shapes_root, "annotations", "instances_val2017.json")) as f:
        gt = json.load(f)
    sizes = {image["id"]: (image["width"], image["height"]) for image in gt["images"]}
    assert {d["image_id"] for d in detections} == set(sizes)
    for d in detections:
        x, y, w, h = d["bbox"]
        width, height = sizes[d["image_id"]]
        assert d["category_id"] in (1, 2, 3) and 0 <= d["score"] <= 1
        assert -0.01 <= x and -0.01 <= y and w >= 0 and h >= 0 and x + w <= width + 0.01 and y + h <= height + 0.01


def test_eval_rejects_a_corrupt_checkpoint(trained, shapes_root, tmp_path, capsys) -> None:
    bad = tmp_path / "corrupt.pth"
    with open(os.path.join(trained, "checkpoint.pth"), "rb") as f:
        bad.write_bytes(f.read()[:5000])  # truncated
    code = eval_tool.main(
        ["configs/shapes.yaml", "--checkpoint", str(bad), *tiny_overrides(shapes_root, str(tmp_path))]
    )
    assert code == 1
    assert f"checkpoint {bad} is corrupt" in capsys.readouterr().err


def test_eval_rejects_another_architecture(trained, shapes_root, tmp_path, capsys) -> None:
    ckpt = os.path.join(trained, "checkpoint.pth")
    overrides = tiny_overrides(shapes_root, str(tmp_path), "model.hidden_dim=64", "model.dec_layers=1")
    assert eval_tool.main(["configs/shapes.yaml", "--checkpoint", ckpt, *overrides]) == 1
    err = capsys.readouterr().err
    assert "was made for another model than the config describes" in err and ckpt in err
    assert "hidden_dim: the config says 64, the checkpoint 32 (override: model.hidden_dim=32)" in err
    assert "dec_layers: the config says 1, the checkpoint 2 (override: model.dec_layers=2)" in err


def test_read_checkpoint_errors(tmp_path) -> None:
    with pytest.raises(FileNotFoundError, match="does not exist"):
        read_checkpoint(str(tmp_path / "none.pth"))
    (tmp_path / "junk.pth").write_bytes(b"\x00garbage")
    with pytest.raises(CheckpointError, match="corrupt or not a PyTorch file"):
        read_checkpoint(str(tmp_path / "junk.pth"))
    torch.save({"weights": [1, 2]}, tmp_path / "other.pth")
    with pytest.raises(CheckpointError, match=r"other\.pth holds no 'model' state dict.*weights are not tensors"):
        read_checkpoint(str(tmp_path / "other.pth"))
    torch.save({"epoch": 3, "model": {}}, tmp_path / "empty.pth")
    with pytest.raises(CheckpointError, match=r"empty\.pth holds no 'model' state dict \(found keys epoch, model\)"):
        read_checkpoint(str(tmp_path / "empty.pth"))


def test_bf16_autocast_trains_and_evaluates(shapes_root, tmp_path) -> None:
    out = str(tmp_path / "bf16")
    metrics = engine.fit(tiny_config(shapes_root, out, "train.amp=bf16", "train.max_iters_per_epoch=1"))
    assert set(STAT_NAMES) <= set(metrics)
    assert read_checkpoint(os.path.join(out, "checkpoint.pth")).entries["epoch"] == 0


def test_unknown_amp_mode_is_a_config_error(shapes_root, tmp_path) -> None:
    with pytest.raises(ConfigError, match="train.amp"):
        engine.fit(tiny_config(shapes_root, str(tmp_path), "train.amp=fp8"))
