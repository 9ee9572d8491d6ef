"""What an adversarial sweep of the video, hub, best-checkpoint, patience and plot_log features found, fixed: long file
names, videos the MPEG-4 writer refuses, names that would replace infer's own files, a checkpoint that does not fit
leaving an output folder behind, COCO's -1 taken for a score, and plot_log's malformed logs."""

from __future__ import annotations

import json
import os

import cv2
import numpy as np
import pytest
import torch
from _repo import load_tool
from _viz_utils import shapes_image, tiny_config, tiny_model, write_checkpoint, write_image
from tiny_training import tiny_config as training_config

from deformable.inference.run import MANIFEST, output_names, run_inference
from deformable.training import engine, fit
from deformable.training.resume import keep_best, stalled
from deformable.training.run_log import best_logged
from deformable.viz.curves import LogError, figure_formats, plot_curves, read_log
from models.config import ConfigError
from models.files import TMP_PREFIX, atomic_save, atomic_write_text

pytestmark = pytest.mark.usefixtures("one_thread")

CPU = torch.device("cpu")
plot_log = load_tool("plot_log")
eval_tool = load_tool("eval")


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory) -> str:
    return write_checkpoint(str(tmp_path_factory.mktemp("ck") / "checkpoint.pth"), tiny_model(), tiny_config())


def test_names_near_the_file_name_limit_are_written_atomically(tmp_path) -> None:
    """The temporary name beside a target keeps at most 200 bytes of its name: a 250-byte name (or 240 bytes of
    two-byte characters) is written, and nothing temporary is left."""
    for name in ("v" * 246 + ".mp4", "é" * 120 + ".jpg"):
        atomic_write_text(tmp_path / name, "content")
        assert (tmp_path / name).read_text() == "content"
        atomic_save(tmp_path / ("s" + name[1:]), lambda staged: open(staged, "w").write("x"))
    assert not [n for n in os.listdir(tmp_path) if n.startswith(TMP_PREFIX)]


def test_a_video_the_writer_refuses_gets_its_json_and_a_warning(tmp_path, checkpoint) -> None:
    """MPEG-4 takes no side of 8192 pixels: the drawn video is left out, said, and the detections are written; the
    run goes on to the other inputs."""
    wide = str(tmp_path / "pano.avi")
    writer = cv2.VideoWriter(wide, cv2.VideoWriter_fourcc(*"MJPG"), 5, (8192, 32))
    for _ in range(2):
        writer.write(np.full((32, 8192, 3), 90, np.uint8))
    writer.release()
    photo = write_image(str(tmp_path / "photo.png"), shapes_image(30, 40))
    messages: list[str] = []
    out = tmp_path / "out"
    run = run_inference(tiny_config(), checkpoint, [wide, photo], str(out), device=CPU, show_progress=False,
                        draw=lambda image, kept, names: image[..., ::-1].copy(), warn=messages.append)  # fmt: skip
    assert run.videos == [wide] and len(run.images) == 1
    assert any("cannot write the drawn video" in m and "8192x32" in m and "pano.json" in m for m in messages)
    with open(out / "pano.json") as f:
        assert [frame["frame"] for frame in json.load(f)["frames"]] == [0, 1]
    assert not (out / "pano.mp4").exists() and (out / "photo.jpg").exists()


def test_an_input_named_like_the_manifest_does_not_replace_it() -> None:
    names = output_names(["a/.infer-outputs.mp4", "b/results.png", "c/images.jpg"])
    assert os.path.splitext(MANIFEST)[0] + ".jpg" not in names.values()
    assert not {"results.jpg", "images.jpg"} & set(names.values())


def test_a_checkpoint_that_does_not_fit_leaves_no_output_folder(tmp_path) -> None:
    wrong = write_checkpoint(str(tmp_path / "wrong.pth"), tiny_model("model.num_queries=7"), None)
    photo = write_image(str(tmp_path / "photo.png"), shapes_image(30, 40))
    with pytest.raises(ValueError):
        run_inference(tiny_config(), wrong, [photo], str(tmp_path / "out"), device=CPU, show_progress=False)
    assert not (tmp_path / "out").exists()


def test_a_killed_runs_temporary_files_are_cleared_from_the_output_folder(tmp_path, checkpoint) -> None:
    out = tmp_path / "out"
    (out / f"{TMP_PREFIX}clip.mp4.abcd1234").mkdir(parents=True)
    (out / f"{TMP_PREFIX}clip.mp4.abcd1234" / "clip.mp4").write_bytes(b"half a video")
    photo = write_image(str(tmp_path / "photo.png"), shapes_image(30, 40))
    run_inference(tiny_config(), checkpoint, [photo], str(out), device=CPU, show_progress=False)
    assert not [n for n in os.listdir(out) if n.startswith(TMP_PREFIX)]


def test_eval_keeps_hub_revisions_apart() -> None:
    assert eval_tool.results_folder("owner/tiny@v2", []) == os.path.join("runs", "eval", "owner--tiny@v2")
    pull_request = os.path.join("runs", "eval", "owner--tiny@refs--pr--1")
    assert eval_tool.results_folder("owner/tiny@refs/pr/1", []) == pull_request


def test_an_ap_of_minus_one_is_no_score(tmp_path) -> None:
    """COCO's -1 (no ground truth to measure on) neither makes a best checkpoint nor stalls a run."""
    source = tmp_path / "checkpoint.pth"
    source.write_bytes(b"weights")
    log = tmp_path / "log.jsonl"
    log.write_text("".join(json.dumps({"epoch": e, "AP": -1.0}) + "\n" for e in range(3)))
    assert best_logged(str(log), "AP") is None
    assert not keep_best(str(tmp_path), str(source), 3, {"AP": -1.0})
    assert not (tmp_path / "checkpoint_best.pth").exists()
    assert stalled(str(tmp_path), 2, patience=1) is None


def test_patience_needs_evaluations(shapes_root, tmp_path) -> None:
    cfg = training_config(shapes_root, str(tmp_path / "run"), "train.patience=2", "train.eval_every=0")
    with pytest.raises(ConfigError, match="train.patience=2 stops a run on its validation AP, which"):
        fit(cfg)
    assert not (tmp_path / "run").exists()


def test_a_run_that_stalls_at_its_last_epoch_ends_as_usual(shapes_root, tmp_path, monkeypatch, capsys) -> None:
    aps = iter([0.3, 0.1])
    monkeypatch.setattr(engine, "evaluate", lambda *a, **k: ({"AP": next(aps)}, [], {}))
    fit(training_config(shapes_root, str(tmp_path / "run"), "train.epochs=2", "train.patience=1"))
    assert "stopping early" not in capsys.readouterr().out


@pytest.mark.parametrize("epoch", ["null", '"x"', "[1]"])
def test_a_log_line_whose_epoch_is_no_number_is_named(tmp_path, epoch) -> None:
    log = tmp_path / "log.jsonl"
    log.write_text('{"epoch": 0, "lr": 0.1}\n{"epoch": ' + epoch + ', "lr": 0.1}\n')
    with pytest.raises(LogError, match=r"line 2: its epoch .* is not a number"):
        read_log(str(log))


def test_plot_log_edge_cases(tmp_path, capsys) -> None:
    """An int too large for a float is left out like NaN; one epoch gets one tick; pgf (LaTeX) is not offered; a
    write error names the path asked for."""
    figure = plot_curves([{"epoch": 3, "lr": 10**400, "train_loss": 1.0}])
    figure.canvas.draw()
    assert [a.get_title() for a in figure.axes] == ["losses"] and list(figure.axes[0].get_xticks()) == [3]
    assert "pgf" not in figure_formats() and "svg" in figure_formats()
    log = tmp_path / "log.jsonl"
    log.write_text('{"epoch": 0, "lr": 0.1, "train_loss": 2.0}\n')
    if os.path.isdir("/proc"):  # a folder nothing can be created in, root or not
        assert plot_log.main([str(log), "--out", "/proc/c.png"]) == 1
        err = capsys.readouterr().err
        assert "could not write /proc/c.png" in err and TMP_PREFIX not in err
