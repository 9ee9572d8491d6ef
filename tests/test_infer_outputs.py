"""What tools/infer.py writes and where: never over a file the user saved, ids that point at the right data-set
image, the boxes drawn being those written, unreadable images skipped, drawn images too large for JPEG, a rerun into
the same folder leaving exactly its own outputs, and images.json naming each input's drawing."""

from __future__ import annotations

import json
import os

import cv2
import numpy as np
import pytest
import torch
from _repo import load_tool
from _viz_utils import shapes_image, tiny_config, tiny_model, tool_argv_config, write_checkpoint, write_image

from deformable.inference.images import ImageError
from deformable.inference.run import MANIFEST, OutputFolder, result_category_ids, run_inference
from models.config import config_to_dict
from models.files import FolderError

pytestmark = pytest.mark.usefixtures("one_thread")

infer = load_tool("infer")
CPU = torch.device("cpu")


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory) -> str:
    return write_checkpoint(str(tmp_path_factory.mktemp("ck") / "checkpoint.pth"), tiny_model(), tiny_config())


def run_tool(tmp_path, checkpoint: str, *args: str) -> int:
    return infer.main([*tool_argv_config(tmp_path), "--checkpoint", checkpoint, "--device", "cpu", *args])


def contents(folder) -> dict[str, bytes]:
    return {name: (folder / name).read_bytes() for name in sorted(os.listdir(folder))}


def test_an_output_folder_that_holds_an_input_is_refused_before_any_work(tmp_path, checkpoint, capsys) -> None:
    photos = tmp_path / "photos"
    photos.mkdir()
    write_image(str(photos / "a.jpg"), shapes_image(30, 40))
    write_image(str(photos / "b.png"), shapes_image(30, 40, seed=1))
    before = contents(photos)
    assert run_tool(tmp_path, checkpoint, str(photos), "--out", str(photos)) == 1
    err = capsys.readouterr().err
    assert f"holds the input image {photos / 'a.jpg'}" in err and f"--out {photos}_detections" in err
    assert contents(photos) == before  # nothing replaced, nothing added
    # An input reached through a link in another folder is the file in the output folder all the same.
    links = tmp_path / "links"
    links.mkdir()
    os.symlink(photos / "a.jpg", links / "a.jpg")
    with pytest.raises(FolderError, match="holds the input image"):  # before the (missing) checkpoint is read
        run_inference(tiny_config(), str(tmp_path / "missing.pth"), [str(links / "a.jpg")], str(photos), device=CPU,
                      draw=lambda image, result, names: image)  # fmt: skip
    assert contents(photos) == before


def test_a_file_no_run_wrote_is_never_replaced_and_earlier_outputs_are(tmp_path, checkpoint, capsys) -> None:
    photo = write_image(str(tmp_path / "x.png"), shapes_image(30, 40))
    out = tmp_path / "out"
    out.mkdir()
    (out / "x.jpg").write_bytes(b"the user's own x.jpg")
    assert run_tool(tmp_path, checkpoint, photo, "--out", str(out)) == 1
    assert f"already holds {out / 'x.jpg'}, which no earlier run of infer wrote" in capsys.readouterr().err
    assert contents(out) == {"x.jpg": b"the user's own x.jpg"}  # and results.json was not written either

    (out / "x.jpg").unlink()
    assert run_tool(tmp_path, checkpoint, photo, "--out", str(out)) == 0
    first = contents(out)
    assert set(first) == {MANIFEST, "x.jpg", "results.json", "images.json"}
    (out / "x.jpg").write_bytes(b"stale")
    assert run_tool(tmp_path, checkpoint, photo, "--out", str(out)) == 0  # a rerun replaces its own files
    assert contents(out) == first

    # A folder written before the list of outputs existed: its images.json names the drawn images.
    (out / MANIFEST).unlink()
    assert run_tool(tmp_path, checkpoint, photo, "--out", str(out)) == 0
    # A list that does not name a file leaves it alone.
    (out / MANIFEST).write_text(json.dumps({"files": ["results.json", "images.json"]}))
    assert run_tool(tmp_path, checkpoint, photo, "--out", str(out)) == 1
    assert "x.jpg, which no earlier run of infer wrote" in capsys.readouterr().err


def test_data_set_images_keep_their_ids_and_other_files_get_ids_above_them(tmp_path, checkpoint) -> None:
    root = tmp_path / "data"
    (root / "annotations").mkdir(parents=True)
    (root / "val2017").mkdir()
    entries = [{"id": 5, "file_name": "a.jpg", "width": 40, "height": 30}]
    entries += [{"id": 9, "file_name": "b.jpg", "width": 40, "height": 30}]
    payload = {"images": entries, "annotations": [], "categories": [{"id": 1, "name": "cat"}]}
    (root / "annotations" / "instances_val2017.json").write_text(json.dumps(payload))
    for name in ("a.jpg", "b.jpg"):
        write_image(str(root / "val2017" / name), shapes_image(30, 40))
    other = tmp_path / "other"
    other.mkdir()
    for name in ("x.jpg", "a.jpg", "1.jpg"):  # another a.jpg: a name collision
        write_image(str(other / name), shapes_image(30, 40, seed=2))
    paths = [str(other / "x.jpg"), str(root / "val2017" / "b.jpg"), str(root / "val2017" / "a.jpg")]
    paths += [str(other / "a.jpg"), str(other / "1.jpg")]
    cfg = tiny_config(f"data.root={root}")
    run = run_inference(cfg, checkpoint, paths, str(tmp_path / "out"), score_threshold=0.0, device=CPU,
                        show_progress=False)  # fmt: skip
    ids = {image["file_name"]: image["id"] for image in run.images}
    assert ids == {paths[0]: 10, paths[1]: 9, paths[2]: 5, paths[3]: 11, paths[4]: 12}
    with open(tmp_path / "out" / "images.json") as f:
        assert {image["file_name"]: image["id"] for image in json.load(f)} == ids
    assert {r["image_id"] for r in run.results} == set(ids.values())
    # A file of a data set image's name but of another size is another picture: it gets an id of its own.
    write_image(str(other / "b.jpg"), shapes_image(20, 40))
    again = run_inference(cfg, checkpoint, [str(other / "b.jpg")], str(tmp_path / "o2"), device=CPU,
                          show_progress=False)  # fmt: skip
    assert [image["id"] for image in again.images] == [10]


def test_results_take_the_data_set_s_category_ids_where_the_checkpoint_numbers_them_otherwise(tmp_path) -> None:
    """A checkpoint trained with cat 1 / dog 3, inferred on a data set numbering dog 1 / cat 7 / bird 3: results.json
    holds the data set's ids (as eval's detections do), so that it scores against that annotation file."""
    named = str(tmp_path / "named.pth")
    state = {"model": tiny_model().state_dict(), "config": config_to_dict(tiny_config())}
    torch.save({**state, "class_names": {1: "cat", 3: "dog"}}, named)
    root = tmp_path / "data"
    (root / "annotations").mkdir(parents=True)
    (root / "val2017").mkdir()
    write_image(str(root / "val2017" / "a.jpg"), shapes_image(60, 80))
    categories = [{"id": 1, "name": "dog"}, {"id": 7, "name": "cat"}, {"id": 3, "name": "bird"}]
    payload = {"images": [{"id": 4, "file_name": "a.jpg", "width": 80, "height": 60}], "annotations": []}
    (root / "annotations" / "instances_val2017.json").write_text(json.dumps({**payload, "categories": categories}))
    warned: list[str] = []
    kwargs = dict(score_threshold=0.0, device=CPU, show_progress=False, warn=warned.append)
    photo = [str(root / "val2017" / "a.jpg")]
    plain = run_inference(tiny_config(), named, photo, str(tmp_path / "plain"), **kwargs).results
    run = run_inference(tiny_config(f"data.root={root}"), named, photo, str(tmp_path / "out"), **kwargs)
    assert {r["category_id"] for r in plain} == {1, 3}  # the checkpoint's labels
    assert [r["category_id"] for r in run.results] == [{1: 7, 3: 1}[r["category_id"]] for r in plain]
    assert "category ids are the data set's (where the checkpoint's differ): cat 1 -> 7, dog 3 -> 1" in warned[-1]


def test_result_category_ids_keep_the_checkpoint_s_other_classes_apart() -> None:
    dataset, checkpoint = {1: "dog", 2: "cat"}, {1: "cat", 2: "dog", 3: "bird", 5: "fox"}
    assert result_category_ids(dataset, checkpoint)[0] == {1: 2, 2: 1}  # bird keeps 3, fox 5: no class of the data
    assert result_category_ids({1: "dog", 3: "cat"}, {1: "cat", 3: "bird"})[0] == {1: 3, 3: 4}  # bird's 3 is cat's
    assert result_category_ids({1: "cat"}, {1: "cat"}) == ({}, [])
    assert result_category_ids({1: "cat"}, {0: "LABEL_0"}) == ({}, [])  # no shared name: the ids are taken as they are


def test_the_drawn_boxes_are_those_written(tmp_path) -> None:
    """Labels the checkpoint does not name (class 0 of the original's convention, here also 2) are neither written
    nor drawn."""
    named = str(tmp_path / "named.pth")
    state = {"model": tiny_model().state_dict(), "config": config_to_dict(tiny_config())}
    torch.save({**state, "class_names": {1: "cat", 3: "dog"}}, named)
    photo = write_image(str(tmp_path / "p.png"), shapes_image(60, 80))
    drawn: list[dict[str, torch.Tensor]] = []

    def draw(image: np.ndarray, result, names) -> np.ndarray:
        drawn.append(dict(result))
        return cv2.cvtColor(image, cv2.COLOR_RGB2BGR)

    unnamed = str(tmp_path / "unnamed.pth")
    torch.save(state, unnamed)
    kwargs = dict(score_threshold=0.0, device=CPU, show_progress=False, draw=draw)
    everything = run_inference(tiny_config(), unnamed, [photo], str(tmp_path / "all"), **kwargs).results
    assert {r["category_id"] for r in everything} - {1, 3}  # there is something to drop
    drawn.clear()
    run = run_inference(tiny_config(), named, [photo], str(tmp_path / "out"), **kwargs)
    assert len(drawn) == 1 and set(drawn[0]["labels"].tolist()) <= {1, 3}
    assert [r["category_id"] for r in run.results] == drawn[0]["labels"].tolist()
    assert [r["score"] for r in run.results] == pytest.approx(drawn[0]["scores"].tolist())


def test_an_unreadable_image_is_skipped_named_and_listed(tmp_path, checkpoint, capsys) -> None:
    photos = tmp_path / "photos"
    photos.mkdir()
    write_image(str(photos / "a.jpg"), shapes_image(30, 40))
    (photos / "b.jpg").write_bytes(b"not a JPEG")
    write_image(str(photos / "c.png"), shapes_image(30, 40, seed=1))
    out = tmp_path / "out"
    assert run_tool(tmp_path, checkpoint, str(photos), "--out", str(out), "--batch-size", "2") == 0
    captured = capsys.readouterr()
    assert f"warning: cannot read image {photos / 'b.jpg'}" in captured.err and "; skipped" in captured.err
    assert f"1 unreadable image(s) skipped (reasons above):\n  {photos / 'b.jpg'}" in captured.err
    assert "in 2 images written" in captured.out
    with open(out / "images.json") as f:
        assert [os.path.basename(image["file_name"]) for image in json.load(f)] == ["a.jpg", "c.png"]
    assert {"a.jpg", "c.jpg", "results.json"} <= set(os.listdir(out)) and "b.jpg" not in os.listdir(out)
    assert not [name for name in os.listdir(out) if name.startswith(".tmp-")]  # written atomically


@pytest.mark.parametrize("value", ["nan", "2", "-1"])
def test_the_score_threshold_is_checked_first(tmp_path, value, capsys) -> None:
    photo = write_image(str(tmp_path / "p.png"), shapes_image(20, 20))
    out = tmp_path / "out"
    with pytest.raises(SystemExit) as refused:  # an option's value: argparse's status and usage line
        run_tool(tmp_path, str(tmp_path / "missing.pth"), photo, "--out", str(out), "--score-threshold", value)
    assert refused.value.code == 2
    err = capsys.readouterr().err
    assert f"--score-threshold must be a score in [0, 1], got {float(value)}" in err and "missing.pth" not in err
    assert not out.exists()


def test_a_drawn_image_too_long_for_jpeg_is_written_as_png_and_said(tmp_path, monkeypatch) -> None:
    folder = OutputFolder(str(tmp_path / "out"))
    messages: list[str] = []
    tall = np.zeros((65501, 2, 3), np.uint8)
    assert folder.write_drawn("tall.jpg", tall, "photos/tall.png", messages.append) == "tall.png"
    assert cv2.imread(str(tmp_path / "out" / "tall.png")).shape == tall.shape
    assert not (tmp_path / "out" / "tall.jpg").exists()
    assert len(messages) == 1 and "photos/tall.png is 2x65501 pixels, beyond JPEG's 65500" in messages[0]
    assert "tall.png" in json.loads((tmp_path / "out" / MANIFEST).read_text())["files"]
    # Any other failure to encode is an error naming the file.
    monkeypatch.setattr(cv2, "imencode", lambda ext, image: (False, None))
    with pytest.raises(FolderError, match=r"cannot write the drawn image .*small\.jpg \(2x2 pixels\)"):
        folder.write_drawn("small.jpg", np.zeros((2, 2, 3), np.uint8), "small.png", messages.append)


def test_a_data_set_the_config_names_but_that_is_not_found_is_said(tmp_path, checkpoint, monkeypatch) -> None:
    """A checkpoint's saved data.root is often relative to where training ran: from elsewhere the data set is not
    found, and the ids, starting at 1, could be those of its other images."""
    photo = write_image(str(tmp_path / "x.png"), shapes_image(30, 40))
    messages: list[str] = []
    monkeypatch.chdir(tmp_path)
    options = dict(device=CPU, show_progress=False, warn=messages.append)
    run_inference(tiny_config("data.root=../somewhere/raccoon"), checkpoint, [photo], str(tmp_path / "out"), **options)
    assert len(messages) == 1 and "data.root=../somewhere/raccoon) is not found from" in messages[0]
    messages.clear()
    weights = str(tmp_path / "weights.pth")  # weights alone (COCO's, say) name no data set of the user's
    torch.save(tiny_model().state_dict(), weights)
    default = tiny_config("data.root=data/coco")
    run_inference(default, weights, [photo], str(tmp_path / "o2"), **options)
    assert messages == []
    # A checkpoint of this project was trained on its config's data set, even one at the default's path.
    run_inference(default, checkpoint, [photo], str(tmp_path / "o3"), **options)
    assert len(messages) == 1 and "data.root=data/coco) is not found from" in messages[0]


def test_the_list_of_outputs_names_only_what_was_written(tmp_path, checkpoint) -> None:
    good = write_image(str(tmp_path / "good.png"), shapes_image(30, 40))
    broken = tmp_path / "broken.png"
    broken.write_bytes(b"\x89PNG but not really")
    out = tmp_path / "out"
    warned: list[str] = []
    found = run_inference(tiny_config(), checkpoint, [good, str(broken)], str(out), device=CPU, show_progress=False,
                          draw=lambda image, result, names: image, warn=warned.append)  # fmt: skip
    assert list(found.skipped) == [str(broken)] and any("broken.png" in message for message in warned)
    listed = json.loads((out / MANIFEST).read_text())["files"]
    assert sorted(listed) == ["good.jpg", "images.json", "results.json"]  # not broken.jpg, which was never written
    # Nothing readable: nothing written, nothing listed.
    with pytest.raises(ImageError, match="none of the 1 inputs could be read"):
        run_inference(tiny_config(), checkpoint, [str(broken)], str(tmp_path / "none"), device=CPU,
                      show_progress=False, draw=lambda image, result, names: image, warn=warned.append)  # fmt: skip
    assert json.loads((tmp_path / "none" / MANIFEST).read_text())["files"] == []


def collection(tmp_path) -> dict[str, str]:
    """``coll/x/p.jpg``, ``coll/x/p.png`` and ``coll/y/p.jpg``: three inputs of one stem, each of its own height (so
    that a drawing shows whose it is)."""
    paths = {}
    for n, name in enumerate(("x/p.jpg", "x/p.png", "y/p.jpg")):
        os.makedirs(tmp_path / "coll" / os.path.dirname(name), exist_ok=True)
        paths[name] = write_image(str(tmp_path / "coll" / name), shapes_image(30 + 4 * n, 40, seed=n))
    return paths


def listed(folder) -> list[str]:
    return json.loads((folder / MANIFEST).read_text())["files"]


def write_video(path: str, frames: int = 2) -> str:
    writer = cv2.VideoWriter(path, cv2.VideoWriter_fourcc(*"mp4v"), 5.0, (64, 48))
    assert writer.isOpened()
    for n in range(frames):
        writer.write(cv2.cvtColor(shapes_image(48, 64, seed=n), cv2.COLOR_RGB2BGR))
    writer.release()
    return path


def test_a_rerun_removes_what_an_earlier_run_wrote_and_it_did_not(tmp_path, checkpoint, capsys) -> None:
    collection(tmp_path)
    coll, out = tmp_path / "coll", tmp_path / "out"
    assert run_tool(tmp_path, checkpoint, str(coll / "x"), str(coll / "y"), "--out", str(out)) == 0
    assert sorted(os.listdir(out)) == [MANIFEST, "images.json", "p.jpg", "p_1.jpg", "p_2.jpg", "results.json"]
    (out / "notes.txt").write_text("the user's")
    capsys.readouterr()
    assert run_tool(tmp_path, checkpoint, str(coll / "y"), "--out", str(out)) == 0
    assert sorted(os.listdir(out)) == [MANIFEST, "images.json", "notes.txt", "p.jpg", "results.json"]
    assert listed(out) == ["images.json", "p.jpg", "results.json"]  # exactly this run's files
    assert "; 2 file(s) an earlier run wrote there removed" in capsys.readouterr().out
    entries = json.loads((out / "images.json").read_text())
    assert [(entry["file_name"], entry["drawn"]) for entry in entries] == [(str(coll / "y" / "p.jpg"), "p.jpg")]
    assert cv2.imread(str(out / "p.jpg")).shape[:2] == (38, 40)  # coll/y/p.jpg's drawing, not an earlier one


def test_images_json_names_each_input_s_drawing_and_a_video_s_json_its_drawn_video(tmp_path, checkpoint) -> None:
    paths = collection(tmp_path)
    clip = write_video(str(tmp_path / "coll" / "y" / "p.mp4"))  # the fourth "p": p_3.mp4 and p_3.json
    out = tmp_path / "out"
    coll = tmp_path / "coll"
    assert run_tool(tmp_path, checkpoint, str(coll / "x"), str(coll / "y"), "--out", str(out)) == 0
    with open(out / "images.json") as f:
        images = json.load(f)
    assert all({"id", "file_name", "height", "width", "drawn"} == set(image) for image in images)
    drawn = {image["file_name"]: image["drawn"] for image in images}
    assert drawn == {paths["x/p.jpg"]: "p.jpg", paths["x/p.png"]: "p_1.jpg", paths["y/p.jpg"]: "p_2.jpg"}
    for image in images:  # each drawing is its input's (their heights differ)
        assert cv2.imread(str(out / image["drawn"])).shape[:2] == (image["height"], image["width"])
    with open(out / "p_3.json") as f:
        video = json.load(f)
    assert (video["video"], video["drawn"]) == (clip, "p_3.mp4") and (out / "p_3.mp4").is_file()
    # Without a drawing function nothing is drawn, and images.json says so.
    quiet = dict(device=CPU, show_progress=False, warn=lambda message: None)
    run = run_inference(tiny_config(), checkpoint, [paths["x/p.jpg"]], str(tmp_path / "plain"), **quiet)
    assert [image["drawn"] for image in run.images] == [None]


def test_a_run_that_fails_midway_removes_nothing_and_lists_what_is_there(tmp_path, checkpoint) -> None:
    paths = collection(tmp_path)
    out = tmp_path / "out"
    kwargs = dict(device=CPU, show_progress=False, draw=lambda image, result, names: image, warn=lambda message: None)
    run_inference(tiny_config(), checkpoint, [paths["x/p.jpg"], paths["x/p.png"]], str(out), **kwargs)
    first = contents(out)
    assert set(first) == {MANIFEST, "images.json", "p.jpg", "p_1.jpg", "results.json"}
    q, r = (write_image(str(tmp_path / name), shapes_image(30, 40, seed=7)) for name in ("q.png", "r.png"))
    drawn: list[int] = []

    def interrupted(image: np.ndarray, result, names) -> np.ndarray:
        if drawn:
            raise KeyboardInterrupt  # Ctrl-C while drawing r.png, after q.jpg was written
        drawn.append(1)
        return image

    with pytest.raises(KeyboardInterrupt):
        run_inference(tiny_config(), checkpoint, [q, r], str(out), **{**kwargs, "draw": interrupted})
    after = contents(out)
    assert set(after) == set(first) | {"q.jpg"}
    earlier = set(first) - {MANIFEST}
    assert {name: after[name] for name in earlier} == {name: first[name] for name in earlier}  # untouched
    assert listed(out) == sorted(set(after) - {MANIFEST})  # r.jpg, claimed but never written, is not listed
    # No input readable: the run fails and removes nothing either.
    broken = tmp_path / "broken.png"
    broken.write_bytes(b"not a PNG")
    with pytest.raises(ImageError, match="none of the 1 inputs could be read"):
        run_inference(tiny_config(), checkpoint, [str(broken)], str(out), **kwargs)
    assert contents(out) == after
    # The next run that succeeds leaves its own files alone.
    run_inference(tiny_config(), checkpoint, [q], str(out), **kwargs)
    assert sorted(os.listdir(out)) == [MANIFEST, "images.json", "q.jpg", "results.json"]
    assert listed(out) == ["images.json", "q.jpg", "results.json"]


def test_a_rerun_removes_only_files_of_the_folder_that_the_manifest_lists(tmp_path, checkpoint) -> None:
    """A manifest is a file anyone may edit: an entry outside the folder (absolute, through ``..``), in a folder of
    it, or naming a folder or a link is never followed; files it does not list are never removed."""
    out = tmp_path / "out"
    (out / "sub").mkdir(parents=True)
    victim = tmp_path / "victim.jpg"
    victim.write_bytes(b"keep")
    (out / "sub" / "inner.jpg").write_bytes(b"keep")
    (out / "folder.jpg").mkdir()
    os.symlink(victim, out / "link.jpg")
    (out / "mine.jpg").write_bytes(b"the user's")
    entries = [str(victim), "../victim.jpg", "sub/inner.jpg", "sub/../../victim.jpg", "sub", "folder.jpg", "link.jpg"]
    (out / MANIFEST).write_text(json.dumps({"files": [*entries, ".", "..", "", 3, None, MANIFEST]}))
    photo = write_image(str(tmp_path / "photo.png"), shapes_image(30, 40))
    quiet = dict(device=CPU, show_progress=False, warn=lambda message: None)
    kwargs = dict(quiet, draw=lambda image, result, names: image)
    run = run_inference(tiny_config(), checkpoint, [photo], str(out), **kwargs)
    assert victim.read_bytes() == b"keep" and (out / "sub" / "inner.jpg").read_bytes() == b"keep"
    assert (out / "folder.jpg").is_dir() and os.readlink(out / "link.jpg") == str(victim)
    assert (out / "mine.jpg").read_bytes() == b"the user's"
    assert listed(out) == ["images.json", "photo.jpg", "results.json"] and run.removed == []
    # An earlier drawing given as an input (drawing nothing, the output folder may hold inputs) is not removed.
    run = run_inference(tiny_config(), checkpoint, [str(out / "photo.jpg")], str(out), **quiet)
    assert (out / "photo.jpg").is_file() and "photo.jpg" in listed(out) and run.removed == []
    # A folder written before the manifest existed: its drawings may be replaced, but no manifest lists them.
    (out / MANIFEST).unlink()
    other = write_image(str(tmp_path / "other.png"), shapes_image(30, 40, seed=3))
    run = run_inference(tiny_config(), checkpoint, [other], str(out), **kwargs)
    assert (out / "photo.jpg").is_file() and listed(out) == ["images.json", "other.jpg", "results.json"]
    assert run.removed == []


def test_unreadable_videos_and_an_output_folder_holding_one_are_called_videos(tmp_path, checkpoint, capsys) -> None:
    clips = tmp_path / "clips"
    clips.mkdir()
    for name in ("a.mp4", "b.mp4"):
        (clips / name).write_text("not a video")
    photo = write_image(str(tmp_path / "photo.png"), shapes_image(30, 40))
    out = str(tmp_path / "out")
    assert run_tool(tmp_path, checkpoint, str(clips / "a.mp4"), str(clips / "b.mp4"), photo, "--out", out) == 0
    err = capsys.readouterr().err
    assert f"warning: 2 unreadable video(s) skipped (reasons above):\n  {clips / 'a.mp4'}\n  {clips / 'b.mp4'}" in err
    broken = tmp_path / "broken.jpg"
    broken.write_bytes(b"not a JPEG")
    assert run_tool(tmp_path, checkpoint, str(clips / "a.mp4"), str(broken), photo, "--out", out) == 0
    assert "warning: 2 unreadable input(s) skipped (reasons above)" in capsys.readouterr().err
    assert run_tool(tmp_path, checkpoint, str(clips), "--out", str(clips)) == 1
    err = capsys.readouterr().err
    assert f"holds the input video {clips / 'a.mp4'}: the drawn videos would be written among your videos" in err
