"""tools/visualize.py and tools/plot_log.py end to end on a tiny model, a generated image and a generated log."""

from __future__ import annotations

import json
import os
import warnings

import cv2
import pytest
from _repo import load_tool
from _viz_utils import shapes_image, tiny_config, tiny_model, tool_argv_config, write_checkpoint, write_image

from deformable.viz.curves import plot_curves

pytestmark = pytest.mark.usefixtures("one_thread")

visualize = load_tool("visualize")
plot_log = load_tool("plot_log")


@pytest.fixture(scope="module")
def files(tmp_path_factory) -> dict[str, str]:
    root = tmp_path_factory.mktemp("viz")
    bad = root / "broken.jpg"
    bad.write_bytes(b"this is not a JPEG")
    return {
        "root": str(root),
        "image": write_image(str(root / "shapes.png"), shapes_image(60, 80)),
        "broken": str(bad),
        "checkpoint": write_checkpoint(str(root / "checkpoint.pth"), tiny_model(), tiny_config()),
    }


def _run(tmp_path, files, *args: str) -> tuple[int, str]:
    out = os.path.join(str(tmp_path), "figure.png")
    argv = [*tool_argv_config(tmp_path), "--image", files["image"], "--out", out, "--device", "cpu", *args]
    return visualize.main(argv), out


def test_decoder_view_with_checkpoint_panels(tmp_path, files, capsys) -> None:
    args = ("--checkpoint", files["checkpoint"], "--panels", "--top-k", "2", "--score-threshold", "0", "--scale", "2")
    code, out = _run(tmp_path, files, *args, "--color-by", "head", "--layer", "0")
    assert code == 0, capsys.readouterr().err
    figure = cv2.imread(out)
    # two 160x120 panels side by side (8 px apart), each with a legend below
    assert figure.shape[1] == 2 * 160 + 8 and figure.shape[0] > 120


def test_decoder_view_random_weights_warns_and_shows_the_best_query(tmp_path, files) -> None:
    with pytest.warns(UserWarning) as caught:
        code, out = _run(tmp_path, files, "--score-threshold", "0.99", "--scale", "1")
    assert code == 0 and cv2.imread(out).shape[1] == 80
    messages = " ".join(str(w.message) for w in caught)
    assert "randomly initialised" in messages and "no detection scores >= 0.99" in messages


def test_encoder_view_and_cope_strips(tmp_path, files) -> None:
    code, out = _run(tmp_path, files, "--checkpoint", files["checkpoint"], "--pixel", "30,20", "--scale", "2")
    assert code == 0 and cv2.imread(out).shape[1] == 160
    with pytest.warns(UserWarning):
        code, out = _run(tmp_path, files, "--pixel", "30,20", "--scale", "2", "model.enc_offset_mode=cope")
    assert code == 0 and cv2.imread(out).shape[1] > 160  # the column strips are on the right


def test_a_fractional_pixel_reads_the_pixel_that_holds_it(tmp_path, files) -> None:
    """The image is 80 x 60: (79.9, 59.9) lies in its last pixel, whose query is shown."""
    code, out = _run(tmp_path, files, "--checkpoint", files["checkpoint"], "--pixel", "79.9,59.9", "--scale", "1")
    assert code == 0 and cv2.imread(out).shape[1] == 80


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (("--image", "missing.jpg"), "image missing.jpg does not exist"),
        (("--pixel", "80,10"), "outside the image"),
        (("--pixel", "ten"), "--pixel must be X,Y"),
        (("--layer", "5"), "layer 5 does not exist: the decoder has layers 0..1"),
        (("--checkpoint", "nowhere.pth"), "checkpoint nowhere.pth does not exist"),
        (("--query-level", "1"), "--query-level picks the query of the encoder view: give --pixel X,Y with it"),
    ],
)
def test_errors_name_the_problem(tmp_path, files, capsys, args, message) -> None:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # random weights
        code, _ = _run(tmp_path, files, *args)
    assert code == 1 and message in capsys.readouterr().err


def test_unreadable_image_names_the_file(tmp_path, files, capsys) -> None:
    code, _ = _run(tmp_path, files, "--image", files["broken"])
    err = capsys.readouterr().err
    assert code == 1 and f"cannot read image {files['broken']}" in err


def _write_log(path: str, lines: list[str]) -> str:
    with open(path, "w") as f:
        f.write("\n".join(lines) + "\n")
    return path


def test_plot_log(tmp_path, capsys) -> None:
    records = []
    for epoch in range(4):
        record = {"epoch": epoch, "lr": 2e-4 if epoch < 3 else 2e-5, "train_loss": 9.0 - epoch, "train_loss_ce": 2.0}
        record.update({"train_loss_ce_0": 3.0, "train_grad_norm": 1.0, "time_s": 3.0})
        if epoch % 2 == 1:
            record.update({"AP": 0.1 * epoch, "AP50": 0.2 * epoch, "APs": -1.0})
        records.append(json.dumps(record))
    log = _write_log(str(tmp_path / "log.jsonl"), records)
    out = str(tmp_path / "curves.png")
    assert plot_log.main([log, "--out", out]) == 0
    figure = cv2.imread(out)
    assert figure.shape == (340, 3 * 520, 3)  # losses, learning rate, AP: 5.2 x 3.4 inches each at 100 dpi
    assert plot_log.main([str(tmp_path), "--out", out]) == 0  # the run folder works too
    from deformable.viz.curves import chart_groups

    groups = {title: set(series) for title, series, _ in chart_groups([json.loads(r) for r in records])}
    assert groups == {"losses": {"train_loss", "train_loss_ce"}, "learning rate": {"lr"}, "COCO AP": {"AP", "AP50"}}


def test_plot_log_errors_name_the_file_and_line(tmp_path, capsys) -> None:
    log = _write_log(str(tmp_path / "log.jsonl"), ['{"epoch": 0, "lr": 0.1}', "{not json"])
    assert plot_log.main([log, "--out", str(tmp_path / "c.png")]) == 1
    assert f"{log} line 2 is not JSON" in capsys.readouterr().err
    assert plot_log.main([str(tmp_path / "none.jsonl")]) == 1
    assert "cannot read log" in capsys.readouterr().err
    picture = tmp_path / "curves.png"
    picture.write_bytes(b"\x89PNG\r\n\x1a\n" + bytes(32))  # an image given as the log
    assert plot_log.main([str(picture), "--out", str(tmp_path / "c.png")]) == 1
    assert f"{picture} is not a log.jsonl: not UTF-8 text (byte 0x89 at offset 0)" in capsys.readouterr().err
    empty = _write_log(str(tmp_path / "empty.jsonl"), ['{"epoch": 0}'])
    assert plot_log.main([empty, "--out", str(tmp_path / "c.png")]) == 1
    assert f"{empty} has no loss, lr or AP values to plot" in capsys.readouterr().err


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (("--scale", "0"), "--scale must be >= 1, got 0"),
        (("--top-k", "0"), "--top-k must be >= 1, got 0"),
        (("--out", "figure"), "--out 'figure' has no image extension OpenCV writes"),
        (("--score-threshold", "nan"), "--score-threshold must be a score in [0, 1], got nan"),
        (("--score-threshold", "1.5"), "--score-threshold must be a score in [0, 1], got 1.5"),
    ],
)
def test_bad_options_are_refused_before_the_model_runs(tmp_path, files, capsys, args, message, monkeypatch) -> None:
    monkeypatch.setattr(visualize, "load_detector", lambda *a, **k: pytest.fail("the model was loaded"))
    with pytest.raises(SystemExit) as exit_info:
        visualize.main(["--image", files["image"], "--out", str(tmp_path / "v.png"), *args])
    assert exit_info.value.code == 2 and message in capsys.readouterr().err


def test_a_folder_as_image_is_named_as_one(tmp_path, files, capsys) -> None:
    code, _ = _run(tmp_path, files, "--image", str(tmp_path))
    assert code == 1 and f"image {tmp_path} is a folder, not an image file" in capsys.readouterr().err


def test_plot_log_skips_an_unfinished_last_line(tmp_path, capsys) -> None:
    """A run killed (or still writing) mid-line leaves half a record at the end: plotted without it, with a warning;
    half a record anywhere else is still an error."""
    log = str(tmp_path / "log.jsonl")
    with open(log, "w") as f:
        f.write('{"epoch": 0, "lr": 0.1, "train_loss": 2.0}\n{"epoch": 1, "lr": 0.1, "train_lo')
    with pytest.warns(UserWarning, match="line 2 is unfinished"):
        assert plot_log.main([log, "--out", str(tmp_path / "c.png")]) == 0
    assert cv2.imread(str(tmp_path / "c.png")) is not None


def test_the_learning_rate_is_drawn_on_a_log_axis_covering_it() -> None:
    """Losses and AP on linear axes, the learning rate on a log axis whose limits hold every value (a run with a
    step drop, and one with a constant rate: a flat line gets a range around it); epochs are whole numbers."""
    for rates in ([2e-4, 2e-4, 2e-5], [1e-4, 1e-4, 1e-4]):
        records = [{"epoch": e, "lr": lr, "train_loss": 3.0 - e, "AP": 0.1 * e} for e, lr in enumerate(rates)]
        figure = plot_curves(records)
        figure.canvas.draw()  # the limits and ticks are settled on drawing
        losses, rate, ap = figure.axes
        assert [a.get_title() for a in figure.axes] == ["losses", "learning rate", "COCO AP"]
        assert (losses.get_yscale(), rate.get_yscale(), ap.get_yscale()) == ("linear", "log", "linear")
        low, high = rate.get_ylim()
        assert low < min(rates) and max(rates) < high
        assert all(float(t).is_integer() for t in rate.get_xticks())


@pytest.mark.parametrize(("out", "message"), [("curves", "no extension matplotlib writes"), ("c.xyz", "use one of")])
def test_plot_log_names_an_output_format_it_cannot_write(tmp_path, capsys, out, message) -> None:
    log = _write_log(str(tmp_path / "log.jsonl"), ['{"epoch": 0, "lr": 0.1, "train_loss": 2.0}'])
    with pytest.raises(SystemExit, match="2"):  # an option's value: argparse's status and usage line
        plot_log.main([log, "--out", str(tmp_path / out)])
    assert message in capsys.readouterr().err and not os.path.exists(tmp_path / out)


def test_plot_log_writes_vector_formats(tmp_path) -> None:
    log = _write_log(str(tmp_path / "log.jsonl"), ['{"epoch": 0, "lr": 0.1, "train_loss": 2.0}'])
    assert plot_log.main([log, "--out", str(tmp_path / "new" / "curves.svg")]) == 0
    assert (tmp_path / "new" / "curves.svg").read_text().lstrip().startswith("<?xml")
