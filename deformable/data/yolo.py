"""Ultralytics YOLO folders: ``data.yaml``, ``images/<split>/`` and ``labels/<split>/<stem>.txt``.

``data.yaml`` (read with ``yaml.safe_load``) gives ``names`` (a list, or a dict index -> name), and ``train`` /
``val`` / ``test``: a folder of images, a ``.txt`` file listing image paths, or a list of either. They are relative
to ``path`` when given (``path`` itself absolute or relative to the yaml's folder), else to the yaml's folder; an
entry starting with ``../`` that does not exist is also tried without it (Roboflow's YOLO export writes
``../train/images`` beside the yaml). An image's labels are in the same place with the last ``images`` folder
replaced by ``labels`` and the extension by ``.txt``; each line is ``class cx cy w h`` normalised to [0, 1] (or
``class x1 y1 x2 y2 ...``, a polygon, whose enclosing box is used; with ``kpt_shape`` in ``data.yaml``, a pose line
whose keypoints follow the box and are not read). A missing or empty label file means no object; a label file
with no image that is read (a ``.gif``, say) is counted in the split's notes, not left out unnoticed.
YOLO class ``i`` becomes category id ``i + 1``, so K classes take ids 1..K.
"""

from __future__ import annotations

import os
from collections import Counter
from typing import Any

import yaml

from .decode import IMAGE_EXTENSIONS
from .errors import DatasetError, read_text
from .scan import header_sizes
from .split import SplitData, finish_split, list_files, list_image_files

YAML_FILE = "data.yaml"
TOLERANCE = 0.01  # normalised coordinates may stray this far outside [0, 1] (rounding); the box is then clipped


def read_data_yaml(path: str) -> dict[str, Any]:
    """The parsed ``data.yaml``; its ``names`` become ``{class index: name}`` under the key ``names``."""
    try:
        payload = yaml.safe_load(read_text(path))
    except OSError as exc:
        raise DatasetError(f"cannot read {path}: {exc}") from exc
    except yaml.YAMLError as exc:
        raise DatasetError(f"{path} is not valid YAML: {exc}") from exc
    if not isinstance(payload, dict):
        raise DatasetError(f"{path} must hold a mapping with 'names', 'train' and 'val'")
    if "names" not in payload:
        raise DatasetError(f"{path} has no 'names': list the class names, e.g. names: [cat, dog]")
    payload["names"] = _names(payload["names"], path)
    if not payload["names"]:
        raise DatasetError(f"{path}: 'names' is empty; list the class names, e.g. names: [cat, dog]")
    if "nc" in payload:
        nc = _index(payload["nc"])
        if nc is None:
            raise DatasetError(f"{path}: nc must be the number of classes, got {payload['nc']!r}")
        if nc != len(payload["names"]):
            raise DatasetError(f"{path}: nc is {nc} but names has {len(payload['names'])} entries")
    keypoint_fields(payload, path)  # refused here, before any image is read
    return payload


def keypoint_fields(payload: dict[str, Any], path: str) -> int:
    """The numbers after the box on a pose label line: ``K * D`` for data.yaml's ``kpt_shape: [K, D]`` (D 2: x y, or
    3: x y visibility); 0 without ``kpt_shape``. ``payload`` is data.yaml's, read from ``path``."""
    kpt_shape = payload.get("kpt_shape")
    if kpt_shape is None:
        return 0
    if not (
        isinstance(kpt_shape, list)
        and len(kpt_shape) == 2
        and all(_index(v) is not None for v in kpt_shape)
        and _index(kpt_shape[1]) in (2, 3)
    ):
        raise DatasetError(f"{path}: kpt_shape must be [keypoints, 2 or 3], got {kpt_shape!r}")
    return _index(kpt_shape[0]) * _index(kpt_shape[1])


def _names(names: Any, path: str) -> dict[int, str]:
    if isinstance(names, list):
        return {i: str(name) for i, name in enumerate(names)}
    if isinstance(names, dict) and all(_index(k) is not None for k in names):  # int keys, or quoted ones: "0"
        return {_index(k): str(v) for k, v in sorted(names.items(), key=lambda kv: _index(kv[0]))}
    raise DatasetError(f"{path}: 'names' must be a list of class names or a mapping index -> name, got {names!r}")


def _index(key: Any) -> int | None:
    """A class index from a ``names`` key: an int >= 0 or a string of digits, else None."""
    if isinstance(key, int) and not isinstance(key, bool) and key >= 0:
        return key
    return int(key) if isinstance(key, str) and key.isdigit() else None


def split_base(payload: dict[str, Any], yaml_path: str) -> str:
    """The folder that ``train`` / ``val`` entries are relative to: ``path`` or the yaml's folder."""
    folder = os.path.dirname(os.path.abspath(yaml_path))
    path = payload.get("path")
    if not path:
        return folder
    return str(path) if os.path.isabs(str(path)) else os.path.normpath(os.path.join(folder, str(path)))


def _resolve(base: str, entry: str) -> str:
    path = entry if os.path.isabs(entry) else os.path.normpath(os.path.join(base, entry))
    if not os.path.exists(path) and entry.startswith("../"):
        path = os.path.normpath(os.path.join(base, entry[3:]))
    return path


def split_sources(payload: dict[str, Any], yaml_path: str, key: str) -> list[str]:
    """The folders and ``.txt`` lists that the split ``key`` (train, val, test) of ``data.yaml`` names, resolved."""
    entries = payload.get(key)
    if not entries:
        raise DatasetError(f"{yaml_path} has no '{key}' entry (it has: {', '.join(map(str, payload))})")
    base = split_base(payload, yaml_path)
    return [_resolve(base, str(e)) for e in (entries if isinstance(entries, list) else [entries])]


def split_images(payload: dict[str, Any], yaml_path: str, key: str) -> tuple[str, list[str]]:
    """``(image_root, file names relative to it)`` of the split ``key`` (train, val, test) of ``data.yaml``."""
    base = split_base(payload, yaml_path)
    sources = split_sources(payload, yaml_path, key)
    paths: list[str] = []
    for source in sources:
        if os.path.isdir(source):
            paths.extend(os.path.join(source, name) for name in list_image_files(source))
        elif os.path.isfile(source) and source.endswith(".txt"):
            paths.extend(_listed_images(source))
        elif payload.get("path") and not os.path.isdir(base):
            raise DatasetError(
                f"{yaml_path}: '{key}' points to {source}, which does not exist: 'path: {payload['path']}' is used "
                f"as the base directory of the splits, and that folder ({base}) does not exist; correct 'path' "
                "(relative to the folder of data.yaml, or absolute) or remove it to use the folder of data.yaml"
            )
        elif os.path.exists(source):
            raise DatasetError(f"{yaml_path}: '{key}' points to {source}, which is no folder and no .txt list")
        else:
            raise DatasetError(
                f"{yaml_path}: '{key}' points to {source}, which does not exist{_beside(yaml_path, source)}"
            )
    root = sources[0] if len(sources) == 1 and os.path.isdir(sources[0]) else base
    return root, [os.path.relpath(p, root) for p in paths]


def _beside(yaml_path: str, missing: str) -> str:
    """For a split path that does not exist (often written on another machine: ``/content/datasets/x/train/images``),
    the hint that its last one or two folders exist beside ``data.yaml``, with the entry to write; else ''."""
    folder = os.path.dirname(os.path.abspath(yaml_path))
    parts = os.path.normpath(missing).split(os.sep)
    for tail in (parts[-2:], parts[-1:]):
        if all(tail) and os.path.exists(os.path.join(folder, *tail)):
            relative = "/".join(tail)
            return (
                f" (a path from another machine?); {os.path.join(folder, *tail)} exists: write it relative to "
                f"data.yaml, e.g. '{relative}'"
            )
    return ""


def _listed_images(list_file: str) -> list[str]:
    folder = os.path.dirname(list_file)
    paths = []
    for number, line in enumerate(read_text(list_file).splitlines(), start=1):
        entry = line.strip()
        if not entry:
            continue
        path = entry if os.path.isabs(entry) else os.path.normpath(os.path.join(folder, entry))
        if not os.path.isfile(path):
            raise DatasetError(f"{list_file} line {number}: image {path} does not exist")
        paths.append(path)
    return paths


def label_path(image_path: str) -> str:
    """``.../images/<split>/a.jpg`` -> ``.../labels/<split>/a.txt`` (the last ``images`` folder; beside the image
    when there is none)."""
    parts = os.path.normpath(image_path).split(os.sep)
    folders = [i for i, part in enumerate(parts[:-1]) if part == "images"]
    if folders:
        parts[folders[-1]] = "labels"
    return os.path.splitext(os.sep.join(parts))[0] + ".txt"


def labels_without_images(folders: list[str], image_paths: list[str]) -> str | None:
    """What to say about the label files under the labels folders of the image ``folders`` that belong to none of
    ``image_paths`` (their boxes would be left out unnoticed): how many, one of them, and the extensions of the
    images of those names in the image folders (a format not read, e.g. ``.gif``); None when there are none.
    LabelImg's ``classes.txt`` is no label file."""
    wanted = {os.path.normpath(label_path(path)) for path in image_paths}
    unmatched: list[str] = []
    for folder in folders:
        labels = os.path.dirname(label_path(os.path.join(folder, "image.jpg")))
        unmatched.extend(
            path
            for path in (os.path.normpath(os.path.join(labels, name)) for name in list_files(labels, (".txt",)))
            if os.path.basename(path) != "classes.txt" and path not in wanted
        )
    if not unmatched:
        return None
    stems = {os.path.splitext(os.path.basename(path))[0] for path in unmatched}
    others = Counter(
        os.path.splitext(name)[1].lower() or "(no extension)"
        for folder in folders
        for name in list_files(folder)
        if os.path.splitext(os.path.basename(name))[0] in stems
        and not name.lower().endswith((".txt", *IMAGE_EXTENSIONS))
    )
    held = ", ".join(f"{extension} ({count})" for extension, count in others.most_common())
    why = (
        f"the image folder holds images of those names as {held}, a format not read: convert them (read: "
        f"{', '.join(IMAGE_EXTENSIONS)})"
        if others
        else "no image of that name was found"
    )
    return f"{len(unmatched)} label file(s) with no image, their boxes not read (e.g. {unmatched[0]}; {why})"


def parse_label_line(line: str, names: dict[int, str], where: str, keypoint_fields: int = 0) -> tuple[int, list[float]]:
    """``class cx cy w h`` (or a polygon ``class x1 y1 ...``; with ``keypoint_fields``, a pose line ``class cx cy w h``
    and that many keypoint numbers, which are not read) -> ``(class index, [x0, y0, x1, y1] normalised)``.

    ``where`` is ``file line N``, the start of every error message.
    """
    fields = line.split()
    if keypoint_fields:
        if len(fields) != 5 + keypoint_fields:
            raise DatasetError(
                f"{where}: data.yaml's kpt_shape makes a line 'class cx cy w h' and {keypoint_fields} keypoint "
                f"numbers ({5 + keypoint_fields} fields), got {len(fields)}: {line.strip()[:100]!r}"
            )
        fields = fields[:5]
    elif len(fields) != 5 and (len(fields) < 7 or len(fields) % 2 == 0):
        raise DatasetError(
            f"{where}: expected 'class cx cy w h' (5 numbers) or a polygon 'class x1 y1 x2 y2 x3 y3 ...', got "
            f"{len(fields)} field(s): {line.strip()[:100]!r}"
        )
    try:
        number, values = float(fields[0]), [float(v) for v in fields[1:]]
    except ValueError:
        raise DatasetError(f"{where}: not a number in {line.strip()[:100]!r}") from None
    if not number.is_integer() or int(number) not in names:
        raise DatasetError(
            f"{where}: class {fields[0]} is outside the {len(names)} classes of data.yaml's names "
            f"(indices {min(names)}..{max(names)})"
        )
    if any(not -TOLERANCE <= v <= 1 + TOLERANCE for v in values):
        raise DatasetError(f"{where}: coordinates must be normalised to [0, 1], got {line.strip()[:100]!r}")
    if len(fields) == 5:
        cx, cy, w, h = values
        return int(number), [cx - w / 2, cy - h / 2, cx + w / 2, cy + h / 2]
    xs, ys = values[0::2], values[1::2]
    return int(number), [min(xs), min(ys), max(xs), max(ys)]


def read_labels(path: str, names: dict[int, str], keypoint_fields: int = 0) -> list[tuple[int, list[float]]] | None:
    """The boxes of one label file, ``None`` when the file does not exist."""
    if not os.path.isfile(path):
        return None
    lines = read_text(path).splitlines()
    return [
        parse_label_line(line, names, f"{path} line {n}", keypoint_fields)
        for n, line in enumerate(lines, 1)
        if line.strip()
    ]


def read_yolo(yaml_path: str, key: str) -> SplitData:
    """The split ``key`` of the YOLO data set described by ``yaml_path``, as a COCO dict (pixels xywh)."""
    payload = read_data_yaml(yaml_path)
    names, fields = payload["names"], keypoint_fields(payload, yaml_path)
    root, files = split_images(payload, yaml_path, key)
    folders = [source for source in split_sources(payload, yaml_path, key) if os.path.isdir(source)]
    unread = labels_without_images(folders, [os.path.join(root, name) for name in files])
    coco: dict[str, Any] = {"images": [], "annotations": [], "categories": []}
    coco["categories"] = [{"id": index + 1, "name": name} for index, name in names.items()]
    found, source = 0, f"{yaml_path} ({key}: {root})"
    sizes = header_sizes([os.path.join(root, name) for name in files], source)
    for image_id, (name, (height, width)) in enumerate(zip(files, sizes, strict=True), start=1):
        path = os.path.join(root, name)
        coco["images"].append({"id": image_id, "file_name": name, "height": height, "width": width})
        labels = read_labels(label_path(path), names, fields)
        found += labels is not None
        for index, (x0, y0, x1, y1) in labels or []:
            box = [x0 * width, y0 * height, (x1 - x0) * width, (y1 - y0) * height]
            ann = {"id": len(coco["annotations"]) + 1, "image_id": image_id, "category_id": index + 1, "bbox": box}
            coco["annotations"].append({**ann, "iscrowd": 0})
    data = SplitData(layout="yolo", split=key, image_root=root, coco=coco, source=source)
    if files and not found and unread is None:
        data.notes.append(f"no label file found (looked for e.g. {label_path(os.path.join(root, files[0]))})")
    if unread is not None:
        if not files:
            raise DatasetError(f"the yolo split '{key}' has no images: {source} lists none; {unread}")
        data.notes.append(unread)
    return finish_split(data)
