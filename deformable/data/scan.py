"""Every image of the splits a run reads, checked before it starts, so that a bad file stops no run mid-epoch; the
image sizes a reader takes from headers, read alike. Either way every bad file is named in one error.

An image is checked by the loader's own rules (:meth:`DetectionDataset.image_problem`): it opens as an image, its
size with the EXIF orientation applied is the one its annotations give, and it is whole (a JPEG ends with its end
marker, a PNG with IEND; a file that does not, or of another format, is decoded to tell). A header read per image,
in a thread pool (the work waits on the disk), with a progress bar for large data sets.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from typing import TYPE_CHECKING, TypeVar

from tqdm import tqdm

from .decode import image_size
from .errors import DatasetError

if TYPE_CHECKING:
    from .dataset import DetectionDataset

SHOWN = 10  # the bad images a message names; it counts the others
PROGRESS_FROM = 1000  # images: fewer are checked in well under a second, without a progress bar
THREADS = min(16, (os.cpu_count() or 1) + 4)
_Item = TypeVar("_Item")


def find_bad_images(datasets: Sequence[DetectionDataset], show_progress: bool = True) -> str | None:
    """The error message that names the images of ``datasets`` that the loader would refuse (up to :data:`SHOWN`,
    each with its reason, and how many more) and says what to do; None when it reads every one. A split given
    twice (the same split for training and validation) is checked once."""
    unique = list({(dataset.source, dataset.image_root): dataset for dataset in datasets}.values())
    work = [(dataset, image_id) for dataset in unique for image_id in dataset.ids]
    problems = _problems(lambda item: item[0].image_problem(item[1]), work, show_progress)
    if not problems:
        return None
    splits = " and ".join(f"{dataset.split} ({dataset.source})" for dataset in unique)
    return _refusal(
        problems,
        f"{len(work)} images of {splits} cannot be read as annotated (checked before the run starts, so that it "
        "does not stop at them)",
        "re-save or re-export an image that is truncated or unreadable, and correct the width/height an annotation "
        "file gives for the others",
    )


def header_sizes(paths: Sequence[str], source: str) -> list[tuple[int, int]]:
    """``(height, width)`` of each image file of ``paths`` from its header (:func:`~.decode.image_size`), the files
    read in a thread pool.

    Raises:
        DatasetError: naming every file that is no image PIL can read (up to :data:`SHOWN`, and how many more) with
            its reason; ``source`` is the file or folder that lists them.
    """
    sizes: list[tuple[int, int] | None] = [None] * len(paths)

    def read(index: int) -> str | None:
        try:
            sizes[index] = image_size(paths[index])
        except DatasetError as exc:
            return str(exc)
        return None

    problems = _problems(read, range(len(paths)), show_progress=False)
    if problems:
        raise DatasetError(_refusal(problems, f"{len(paths)} images of {source} cannot be read", "re-save them"))
    return sizes


def _problems(check: Callable[[_Item], str | None], items: Sequence[_Item], show_progress: bool) -> list[str]:
    """``check(item)`` for every item, in a thread pool, with a progress bar from :data:`PROGRESS_FROM` items: the
    messages it returned, in the order of ``items``."""
    disable = not show_progress or len(items) < PROGRESS_FROM
    bar = tqdm(total=len(items), desc="checking images", unit="image", disable=disable, leave=False)
    problems = []
    with ThreadPoolExecutor(THREADS) as pool, bar:
        for problem in pool.map(check, items):
            bar.update()
            if problem is not None:
                problems.append(problem)
    return problems


def _refusal(problems: list[str], what: str, fix: str) -> str:
    """``N of the <what>:``, a line per problem (the first :data:`SHOWN`, then how many more), and what to do."""
    named = "".join(f"\n  {problem}" for problem in problems[:SHOWN])
    more = f"\n  ... and {len(problems) - SHOWN} more" if len(problems) > SHOWN else ""
    return (
        f"{len(problems)} of the {what}:{named}{more}\nremove these images from the data set (with their "
        f"annotations), or fix them: {fix}"
    )
