"""Fixtures shared by the test modules.

- ``one_thread``: one intra-op thread for a whole module. Tiny models run several times faster on one thread than on
  two on a shared 2-core machine, and the results do not depend on the thread count. A module asks for it with
  ``pytestmark = pytest.mark.usefixtures("one_thread")``; the op tests do not, so that the CPU kernel's parallel paths
  run at torch's default thread count.
- ``default_backend`` (every test): ``DEFORMABLE_BACKEND`` unset, so tests run on the native path unless they choose
  otherwise, whatever the caller's environment says; ``backend``: runs a test on both paths of
  ``deformable.ms_deform_attn`` (native, and PyTorch through ``DEFORMABLE_BACKEND``).
- ``shapes_root``: a folder for the synthetic shapes data set, shared by the whole session; the first training run
  that names it as ``data.root`` generates the data there (``data.synthetic=shapes`` and the folder missing).
- ``finished``: the output folder of a 1-epoch tiny training run on ``shapes_root`` (one per module), read-only for
  the tests (each copies what it changes).
- ``official_keys``: the official checkpoint's state_dict keys and shapes, from the JSON file that
  ``DEFORMABLE_OFFICIAL_KEYS`` names; the test is skipped, saying so, when it is not set.

Plain helpers (the repository root, a tool imported by path, a path from the environment) are in ``_repo.py``.
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterator

import pytest
import torch
from _repo import SHARED, path_from_env

from deformable import _extension


@pytest.fixture(scope="module")
def one_thread() -> Iterator[None]:
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(autouse=True)
def default_backend(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("DEFORMABLE_BACKEND", raising=False)


@pytest.fixture(params=["native", "pytorch"])
def backend(request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch) -> str:
    if request.param == "native" and not _extension.extension_loaded():
        pytest.skip(f"deformable._C is not built: {_extension.LOAD_ERROR}")
    if request.param == "pytorch":
        monkeypatch.setenv("DEFORMABLE_BACKEND", "pytorch")
    return request.param


@pytest.fixture(scope="session")
def shapes_root(tmp_path_factory: pytest.TempPathFactory) -> str:
    return str(tmp_path_factory.mktemp("data") / "shapes")


@pytest.fixture(scope="module")
def official_keys() -> dict[str, dict]:
    """Per official variant (``single_scale``, ``multi_scale``, ``box_refine``, ``two_stage``): its ``overrides``,
    ``num_classes`` and ``state_dict`` (key -> shape), as the JSON file holds them."""
    what = "the official state_dict key/shape list (a .json file)"
    default = os.path.join(SHARED, "reference", "official_state_dict_keys.json")
    path = path_from_env("DEFORMABLE_OFFICIAL_KEYS", what, "file", default)
    with open(path, encoding="utf-8") as f:
        return json.load(f)


@pytest.fixture(scope="module")
def finished(shapes_root: str, tmp_path_factory: pytest.TempPathFactory) -> str:
    """A 1-epoch tiny run's output folder (checkpoint.pth, config.yaml, log.jsonl), read-only for the tests."""
    from tiny_training import tiny_config  # here: the op tests need not load the training stack

    from deformable.training import engine

    out = str(tmp_path_factory.mktemp("finished"))
    engine.fit(tiny_config(shapes_root, out, "train.eval_every=0"))
    return out
