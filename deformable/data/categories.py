"""Category ids across splits and checkpoints: labels are category ids, so the ids must mean the same classes.

A detector predicts the ids of the data it was trained on. Evaluated on another split or data set, whose ids may
number the same classes differently (VOC numbers the sorted names of the splits it reads; a YOLO export keeps its
own order), the ground truth is renumbered to the checkpoint's ids by class name (:func:`align_to_checkpoint`);
training that starts from a checkpoint naming the same classes (resumed or fine-tuned) renumbers both splits so
(:func:`align_for_training`). A class with validation boxes and no training box cannot be learned
(:func:`classes_without_training_boxes`).
"""

from __future__ import annotations

from collections.abc import Mapping

from .dataset import DetectionDataset, coco_api
from .errors import DatasetError


def _names(categories: Mapping[int, str]) -> str:
    return ", ".join(f"{cat_id}: {name}" for cat_id, name in sorted(categories.items()))


def checkpoint_ids(
    dataset_names: Mapping[int, str], checkpoint_names: Mapping[int, str], owner: str = "the checkpoint"
) -> tuple[dict, list[str]]:
    """The renumbering of a data set's categories to a checkpoint's, by name, and what to tell the user (``owner``
    names whose ids they are in the messages: the training split's, when a validation split is aligned to it).

    Returns:
        ``(mapping, messages)``: ``mapping`` data set id -> id (empty when nothing changes); a class the checkpoint
        does not name gets a fresh id above every id of either (it is kept as ground truth the detector cannot
        predict). Nothing is renumbered when the checkpoint names no class or shares no name with the data set
        (e.g. transformers' placeholder ``LABEL_0``); a message says so in the second case.
    """
    if not checkpoint_names or not dataset_names:
        return {}, []
    by_name = {name: cat_id for cat_id, name in checkpoint_names.items()}
    if not set(by_name) & set(dataset_names.values()):
        return {}, [
            f"warning: no class of the data set ({_names(dataset_names)}) is named as one of {owner}'s "
            f"({_names(checkpoint_names)}); the data set's ids are taken to mean {owner}'s"
        ]
    fresh = max(*checkpoint_names, *dataset_names) + 1
    mapping, unknown = {}, []
    for cat_id, name in sorted(dataset_names.items()):
        if name in by_name:
            mapping[cat_id] = by_name[name]
        else:
            mapping[cat_id], fresh = fresh, fresh + 1
            unknown.append(name)
    messages = []
    moved = {cat_id: new for cat_id, new in mapping.items() if new != cat_id}
    if moved:
        changes = ", ".join(f"{dataset_names[cat_id]} {cat_id} -> {new}" for cat_id, new in moved.items())
        messages.append(f"class ids of the data set renumbered to {owner}'s by name: {changes}")
    if unknown:
        messages.append(
            f"warning: {owner} has no class {', '.join(map(repr, unknown))}; its boxes stay in the ground "
            "truth, which the detector cannot find (AP 0 for it)"
        )
    return (mapping if moved else {}), messages


def align_to_checkpoint(
    dataset: DetectionDataset, checkpoint_names: Mapping[int, str], owner: str = "the checkpoint"
) -> list[str]:
    """Renumbers ``dataset``'s categories (its COCO dict and index, in place) to ``checkpoint_names``' ids by name
    (:func:`checkpoint_ids`); returns the messages to print."""
    mapping, messages = checkpoint_ids(dataset.class_names(), checkpoint_names, owner)
    if mapping:
        previous = dataset.renumbered or {cat_id: cat_id for cat_id in mapping}  # the file's id -> the current one
        dataset.renumbered = {file_id: mapping[current] for file_id, current in previous.items()}
        coco = dataset.data.coco
        for ann in coco["annotations"]:
            ann["category_id"] = mapping[ann["category_id"]]
        coco["categories"] = sorted(
            ({**cat, "id": mapping[cat["id"]]} for cat in coco["categories"]), key=lambda cat: cat["id"]
        )
        dataset.coco = coco_api(coco)
    return messages


def in_dataset_ids(detections: list[dict], dataset: DetectionDataset) -> list[dict]:
    """COCO results in the ids of a data set that :func:`align_to_checkpoint` renumbered, back in the ids of its
    annotation file (so that they score against it); a detection of a class the data set lacks is left out (no id
    of the file names it). Unchanged when nothing was renumbered."""
    if not dataset.renumbered:
        return detections
    original = {new: old for old, new in dataset.renumbered.items()}
    return [{**d, "category_id": original[d["category_id"]]} for d in detections if d["category_id"] in original]


def align_for_training(
    train: DetectionDataset, val: DetectionDataset, checkpoint_names: Mapping[int, str], *, resuming: bool
) -> list[str]:
    """Renumbers both splits to the ids of the checkpoint that training starts from, by name, when the training
    split names the same classes (so that a class head keeps the class it learned); returns the messages to print.

    A fine-tuning start that names other classes (or none), and a start from scratch, leave the training split's ids
    as they are (a fine-tuned class head is re-initialised when the count differs, and kept as a starting point when
    it does not: a message says so), and the validation split is renumbered to the training split's ids by name: its
    own annotation file may number the same classes otherwise, and the detector predicts the training split's ids.

    Raises:
        DatasetError: ``resuming`` and the training split's classes are not the checkpoint's (continuing would train
            its class heads on other classes).
    """
    data_names, start_names = train.class_names(), dict(checkpoint_names)
    if start_names and set(data_names.values()) == set(start_names.values()):
        messages = align_to_checkpoint(train, start_names)
        return messages + [m for m in align_to_checkpoint(val, start_names) if m not in messages]
    if start_names and resuming:
        raise DatasetError(
            f"the checkpoint was trained on the classes {_names(start_names)}, but {train.source} has "
            f"{_names(data_names)}: resuming continues the same training on the same classes. To start from its "
            "weights on these classes, use train.finetune=<checkpoint> with a new output_dir"
        )
    # A validation class the training split lacks gets its own warning (classes_without_training_boxes).
    to_train = [m for m in align_to_checkpoint(val, data_names, "the training split") if "has no class" not in m]
    if start_names and len(data_names) == len(start_names):
        return to_train + [
            f"note: the checkpoint's classes ({_names(start_names)}) are not the data's ({_names(data_names)}); the "
            "class heads are kept as a starting point, class by class in id order"
        ]
    return to_train


def classes_without_training_boxes(train: DetectionDataset, val: DetectionDataset) -> list[str]:
    """Warnings for the classes that have validation boxes and no training box (the detector cannot learn them)."""

    def boxed(dataset: DetectionDataset) -> set[int]:
        return {ann["category_id"] for ann in dataset.coco.dataset["annotations"] if not ann.get("iscrowd", 0)}

    names = val.class_names()
    missing = sorted(boxed(val) - boxed(train))
    return [
        f"warning: {val.source} has boxes of class {names.get(cat_id, '?')!r} (id {cat_id}), which has none in "
        f"{train.source}: the detector cannot learn it (AP 0 for it)"
        for cat_id in missing
    ]
