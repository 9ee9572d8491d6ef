"""tools/convert_checkpoint.py's guards and what a conversion keeps: never onto its source, never over an existing
file without ``--overwrite``, destinations that cannot be written refused before anything is read, and the inference
resize (``data.val_size`` / ``data.val_max_size``) carried through a transformers folder's preprocessor_config.json.

Checkpoints are built by hand from a tiny detector (no training run)."""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path

import pytest
import torch
from _models_utils import tiny_config
from _repo import load_tool

from deformable.data.transforms import resized_shape
from models import build_detector, read_checkpoint
from models.checkpoint import CheckpointError
from models.config import config_to_dict
from models.convert import convert_checkpoint
from models.files import FileTargetError, atomic_save, atomic_write
from models.hf_format import write_hf
from models.hf_preprocessor import PREPROCESSOR_NAME, inference_size_from_hf
from models.loading import config_and_checkpoint

pytestmark = pytest.mark.usefixtures("one_thread")

SIZES = ("data.val_size=64", "data.val_max_size=96")


def _digest(path) -> str:
    with open(path, "rb") as f:
        return hashlib.sha256(f.read()).hexdigest()


@pytest.fixture(scope="module")
def training_checkpoint(tmp_path_factory) -> str:
    """A training checkpoint as train.py writes it: weights, config (inference size 64/96), class names and the
    training state a converted checkpoint does not keep."""
    cfg = tiny_config(*SIZES)
    torch.manual_seed(0)
    model = build_detector(cfg)
    path = str(tmp_path_factory.mktemp("training") / "checkpoint.pth")
    content = {
        "model": model.state_dict(),
        "config": config_to_dict(cfg),
        "class_names": {1: "cat", 2: "dog"},
        "optimizer": {"state": {}, "param_groups": [{"lr": 2e-4}]},
        "lr_scheduler": {"last_epoch": 7},
        "epoch": 7,
        "query_aids": {"step": torch.ones(2)},
        "training_weights": {"w": torch.zeros(3)},
    }
    torch.save(content, path)
    return path


@pytest.fixture
def ckpt(training_checkpoint, tmp_path) -> str:
    """A private copy of the training checkpoint, which a test may try to overwrite."""
    path = tmp_path / "train_ck.pth"
    path.write_bytes(Path(training_checkpoint).read_bytes())
    return str(path)


def _no_temp_files(*folders) -> None:
    for folder in folders:
        assert not [name for name in os.listdir(folder) if name.startswith(".tmp-")], os.listdir(folder)


# -- the source is never the destination, an existing file is replaced only when asked ---------------------------


@pytest.mark.parametrize("extra", [[], ["--overwrite"]], ids=["plain", "overwrite"])
def test_the_source_is_never_the_destination(ckpt, tmp_path, capsys, extra) -> None:
    before = _digest(ckpt)
    tool = load_tool("convert_checkpoint")
    link = tmp_path / "link.pth"
    os.symlink(ckpt, link)
    for destination in (ckpt, str(link), os.path.join(os.path.dirname(ckpt), ".", "train_ck.pth")):
        assert tool.main([ckpt, destination, *extra]) == 1
        assert "is the source" in capsys.readouterr().err
    assert _digest(ckpt) == before
    assert read_checkpoint(ckpt).entries["epoch"] == 7  # the training state is still there
    _no_temp_files(tmp_path)


def test_an_existing_destination_is_replaced_only_with_overwrite(ckpt, tmp_path, capsys) -> None:
    tool = load_tool("convert_checkpoint")
    other = tmp_path / "other.pth"
    other.write_bytes(b"a file the user keeps")
    assert tool.main([ckpt, str(other)]) == 1
    assert f"destination {other} exists: not replaced (--overwrite" in capsys.readouterr().err
    assert other.read_bytes() == b"a file the user keeps"

    assert tool.main([ckpt, str(other), "--overwrite"]) == 0, capsys.readouterr().err
    converted = read_checkpoint(other)
    assert converted.format == "project" and converted.class_names == {1: "cat", 2: "dog"}


def test_hf_destination_follows_the_same_rules(ckpt, tmp_path, capsys) -> None:
    tool = load_tool("convert_checkpoint")
    empty = tmp_path / "empty"
    empty.mkdir()
    assert tool.main([ckpt, str(empty), "--to", "hf"]) == 0, capsys.readouterr().err  # an empty folder is fine
    weights = _digest(empty / "model.safetensors")
    assert tool.main([ckpt, str(empty), "--to", "hf"]) == 1
    err = capsys.readouterr().err
    assert "already holds config.json, preprocessor_config.json, model.safetensors: not replaced" in err
    assert tool.main([ckpt, str(empty), "--to", "hf", "--overwrite"]) == 0, capsys.readouterr().err
    assert _digest(empty / "model.safetensors") == weights  # same weights, rewritten
    # A transformers folder converted into itself, or into a file of it: refused even with --overwrite.
    for destination, to in ((empty, "hf"), (empty / "model.safetensors", "project")):
        assert tool.main([str(empty), str(destination), "--to", to, "--overwrite"]) == 1
        assert "source" in capsys.readouterr().err
    assert _digest(empty / "model.safetensors") == weights
    _no_temp_files(tmp_path, empty)


# -- destinations that cannot be written: said before anything is read ---------------------------------------------


@pytest.mark.parametrize(
    ("destination", "to", "message"),
    [
        ("folder", "project", "destination folder is a folder"),
        ("new/", "project", "ends with a path separator, so it names a folder"),
        ("file.pth/x.pth", "project", "file.pth is a file, not a folder"),
        ("", "project", "destination is empty"),
        ("file.pth", "hf", "the transformers folder file.pth is a file, not a folder"),
        ("file.pth/sub", "hf", "file.pth is a file, not a folder"),
        ("", "hf", "the transformers folder is empty"),
        ("model.safetensors", "project", "safetensors cannot hold; name it .pth, or write a transformers folder"),
        ("new.pth", "hf", "destination new.pth is named like a file, but --to hf writes a folder"),
    ],
    ids=[
        "existing-folder",
        "trailing-slash",
        "under-a-file",
        "empty",
        "hf-onto-file",
        "hf-under-a-file",
        "hf-empty",
        "safetensors-name",
        "hf-named-like-a-file",
    ],
)
def test_unusable_destinations_are_named(ckpt, tmp_path, monkeypatch, capsys, destination, to, message) -> None:
    work = tmp_path / "work"
    (work / "folder").mkdir(parents=True)
    (work / "file.pth").write_bytes(b"kept")
    monkeypatch.chdir(work)  # "" must not write into the working folder's parent (tmp_path)
    monkeypatch.setattr(
        "models.convert.read_checkpoint", lambda *a: pytest.fail("the source was read before the destination checks")
    )
    assert load_tool("convert_checkpoint").main([ckpt, destination, "--to", to]) == 1
    err = capsys.readouterr().err
    assert message in err, err
    assert "Traceback" not in err
    assert sorted(os.listdir(work)) == ["file.pth", "folder"] and (work / "file.pth").read_bytes() == b"kept"
    assert os.listdir(work / "folder") == []
    _no_temp_files(tmp_path, work)


def test_atomic_write_refuses_what_is_no_file_path(tmp_path, monkeypatch) -> None:
    monkeypatch.chdir(tmp_path)
    (tmp_path / "a_file").write_bytes(b"x")
    for path, message in (
        ("", "is empty"),
        (tmp_path, "is a folder"),
        (f"{tmp_path}/new/", "ends with a path separator"),
        (tmp_path / "a_file" / "b", "is a file, not a folder"),
    ):
        with pytest.raises(FileTargetError, match=message):
            atomic_write(path, lambda f: f.write(b"data"))
    assert sorted(os.listdir(tmp_path)) == ["a_file"]
    _no_temp_files(tmp_path, tmp_path.parent)


def test_atomic_save_leaves_nothing_on_failure_and_moves_every_file(tmp_path) -> None:
    target = tmp_path / "model.onnx"
    target.write_bytes(b"previous")

    def failing(path: str) -> None:
        with open(path, "wb") as f:
            f.write(b"half")
        raise RuntimeError("exporter died")

    with pytest.raises(RuntimeError, match="exporter died"):
        atomic_save(target, failing)
    assert target.read_bytes() == b"previous" and sorted(os.listdir(tmp_path)) == ["model.onnx"]

    def with_data(path: str) -> None:  # ONNX above 2 GB: model.onnx names model.onnx.data beside it
        with open(path + ".data", "wb") as f:
            f.write(b"weights")
        with open(path, "wb") as f:
            f.write(b"graph")

    atomic_save(target, with_data)
    assert target.read_bytes() == b"graph" and (tmp_path / "model.onnx.data").read_bytes() == b"weights"
    assert sorted(os.listdir(tmp_path)) == ["model.onnx", "model.onnx.data"]


class _ZipWriter:
    """As torch.save's zip writer: closing it after an interrupted write fails with an error of its own."""

    def __enter__(self) -> None:
        return None

    def __exit__(self, *exc: object) -> None:
        raise RuntimeError("[enforce fail at inline_container.cc:671] . unexpected pos 15406592 vs 15406480")


def _interrupted(target) -> None:
    with _ZipWriter():
        target.write(b"half")
        raise KeyboardInterrupt  # Ctrl-C while the checkpoint is being written


@pytest.mark.parametrize("writer", ["atomic_write", "atomic_save"])
def test_ctrl_c_while_writing_is_an_interrupt_not_the_writers_error(tmp_path, writer: str) -> None:
    """A run stopped by Ctrl-C while it saves exits as interrupted (status 130, its one line) with the previous
    file kept, not with the traceback of torch.save's writer failing to close."""
    target = tmp_path / "checkpoint.pth"
    target.write_bytes(b"previous")

    def save(path: str) -> None:
        with open(path, "wb") as f:
            _interrupted(f)

    def failing(f) -> None:
        with _ZipWriter():
            f.write(b"half")

    with pytest.raises(KeyboardInterrupt) as caught:
        atomic_write(target, _interrupted) if writer == "atomic_write" else atomic_save(target, save)
    assert isinstance(caught.value.__cause__, RuntimeError)  # the writer's error stays in the traceback's chain
    assert target.read_bytes() == b"previous" and os.listdir(tmp_path) == ["checkpoint.pth"]
    with pytest.raises(RuntimeError, match="unexpected pos"):  # without an interrupt, the error is raised as it is
        atomic_write(target, failing)


# -- the inference resize through a transformers folder ------------------------------------------------------------


def test_project_to_hf_and_back_keeps_the_inference_size(ckpt, tmp_path) -> None:
    folder, back = tmp_path / "hf", tmp_path / "back.pth"
    convert_checkpoint(ckpt, folder, to="hf")
    written = json.loads((folder / PREPROCESSOR_NAME).read_text())
    assert written["size"] == {"shortest_edge": 64, "longest_edge": 96}
    assert written["image_processor_type"] == "DeformableDetrImageProcessor" and written["do_normalize"] is True
    convert_checkpoint(folder, back)
    data = read_checkpoint(back).config["data"]
    assert (data["val_size"], data["val_max_size"]) == (64, 96)
    convert_checkpoint(folder, tmp_path / "mine.pth", overrides=["data.val_size=80"])  # an override still wins
    assert read_checkpoint(tmp_path / "mine.pth").config["data"]["val_size"] == 80


def test_transformers_reads_the_written_preprocessor(ckpt, tmp_path) -> None:
    transformers = pytest.importorskip("transformers")
    convert_checkpoint(ckpt, tmp_path / "hf", to="hf")
    processor = transformers.AutoImageProcessor.from_pretrained(tmp_path / "hf")
    assert type(processor).__name__.startswith("DeformableDetrImageProcessor")
    assert (processor.size["shortest_edge"], processor.size["longest_edge"]) == (64, 96)


@pytest.fixture
def hf_folder(tmp_path) -> str:
    cfg = tiny_config()
    write_hf(tmp_path / "hf", build_detector(cfg).state_dict(), cfg.model)
    return str(tmp_path / "hf")


@pytest.mark.parametrize(
    ("preprocessor", "expected"),
    [
        ({"size": {"shortest_edge": 480, "longest_edge": 800}}, (480, 800)),
        ({"size": 600, "max_size": 1000}, (600, 1000)),  # the hub's older layout (SenseTime/deformable-detr)
        ({"size": 800}, (800, 1333)),
        ({"do_normalize": True}, (800, 1333)),  # no size: transformers' default
        ({"size": {"max_height": 480, "max_width": 480}}, (480, 480)),  # transformers' fine-tuning guide
    ],
    ids=["size-dict", "size-and-max-size", "size-only", "no-size", "max-height-width"],
)
def test_a_folder_is_read_with_its_preprocessor_sizes(hf_folder, tmp_path, preprocessor, expected) -> None:
    with open(os.path.join(hf_folder, PREPROCESSOR_NAME), "w") as f:
        json.dump(preprocessor, f)
    assert inference_size_from_hf(hf_folder) == expected
    assert inference_size_from_hf(os.path.join(hf_folder, "model.safetensors")) == expected
    convert_checkpoint(hf_folder, tmp_path / "p.pth")
    data = read_checkpoint(tmp_path / "p.pth").config["data"]
    assert (data["val_size"], data["val_max_size"]) == expected
    # The tools reading the folder directly (eval, infer, visualize, Predictor) resize the same way.
    cfg, _ = config_and_checkpoint(None, [], hf_folder)
    assert (cfg.data.val_size, cfg.data.val_max_size) == expected
    cfg, _ = config_and_checkpoint(None, ["data.val_size=320"], hf_folder)
    assert cfg.data.val_size == 320  # an override wins


@pytest.mark.parametrize(
    ("preprocessor", "message"),
    [
        ({"size": {"height": 800, "width": 800}}, r"size \{'height': 800, 'width': 800\} is not a resize the tools"),
        ({"size": {"max_height": 480, "max_width": 640}}, r"size \{'max_height': 480, 'max_width': 640\} bounds h"),
        ({"size": {"shortest_edge": 0, "longest_edge": 9}}, r"size.shortest_edge must be a whole number .* got 0"),
        ({"do_resize": False}, "do_resize is false"),
        ({"image_mean": [0.5, 0.5, 0.5]}, r"image_mean \[0.5, 0.5, 0.5\] is not ImageNet's"),
        ({"rescale_factor": 1.0}, "rescale_factor 1.0 is not 1/255"),
    ],
    ids=["fixed-size", "unequal-bounds", "zero", "no-resize", "other-mean", "no-rescale"],
)
def test_preprocessor_the_tools_cannot_follow_is_named(hf_folder, tmp_path, preprocessor, message) -> None:
    with open(os.path.join(hf_folder, PREPROCESSOR_NAME), "w") as f:
        json.dump(preprocessor, f)
    with pytest.raises(CheckpointError, match=rf"preprocessor_config\.json: {message}"):
        convert_checkpoint(hf_folder, tmp_path / "p.pth")
    assert not (tmp_path / "p.pth").exists()


def test_max_height_width_is_transformers_resize_but_for_rounding() -> None:
    image_utils = pytest.importorskip("transformers.image_utils")
    for height, width, side in [(480, 640, 480), (1000, 250, 640), (333, 1000, 800), (2000, 1999, 320), (50, 60, 800)]:
        theirs = image_utils.get_image_size_for_max_height_width((height, width), side, side)
        ours = resized_shape(height, width, side, side)
        assert max(abs(a - b) for a, b in zip(theirs, ours, strict=True)) <= 2, (height, width, side, theirs, ours)


@pytest.mark.parametrize(
    "preprocessor",
    [
        {"size": {"height": 640, "width": 640}},
        {"size": {"max_height": 480, "max_width": 640}},
        {"do_resize": False},
        {"size": {"shortest_edge": 80.0, "longest_edge": 0}},
    ],
    ids=["fixed-size", "unequal-bounds", "no-resize", "malformed"],
)
def test_a_resize_the_tools_cannot_apply_yields_to_the_user_s_sizes(hf_folder, preprocessor) -> None:
    with open(os.path.join(hf_folder, PREPROCESSOR_NAME), "w") as f:
        json.dump(preprocessor, f)
    with pytest.raises(CheckpointError, match="pass data.val_size=N data.val_max_size=M"):
        config_and_checkpoint(None, [], hf_folder)
    with pytest.raises(CheckpointError, match="pass data.val_size=N"):  # training's image size is no inference resize
        config_and_checkpoint(None, ["data.image_size=96"], hf_folder)
    said = "resized instead to short side data.val_size=640, long side at most data.val_max_size="
    with pytest.warns(UserWarning, match=f"{said}640"):
        cfg, _ = config_and_checkpoint(None, ["data.val_size=640", "data.val_max_size=640"], hf_folder)
    assert (cfg.data.val_size, cfg.data.val_max_size) == (640, 640)
    with pytest.warns(UserWarning, match=f"{said}1333"):  # the sizes used are said, the default's included
        config_and_checkpoint(None, ["data.val_size=640"], hf_folder)
    with open(os.path.join(hf_folder, PREPROCESSOR_NAME), "w") as f:
        json.dump({**preprocessor, "image_mean": [0.5, 0.5, 0.5]}, f)
    with pytest.raises(CheckpointError, match="image_mean"):  # other pixel statistics: no override helps
        config_and_checkpoint(None, ["data.val_size=640", "data.val_max_size=640"], hf_folder)
