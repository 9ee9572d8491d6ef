"""Checkpoints named by a Hugging Face hub id: read from the hub's cache through huggingface_hub's own
``snapshot_download`` (offline here: the cache is laid out as the hub writes it), with clear errors when the model
cannot be had, and no hub look-up for what is a local path."""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import huggingface_hub
import pytest
import torch
from _models_utils import tiny_config
from _repo import load_tool
from huggingface_hub import constants as hub_constants

import models
from models.convert import convert_checkpoint
from models.hf_format import write_hf
from models.hub import hub_id, resolve_checkpoint

COMMIT = "0123456789abcdef0123456789abcdef01234567"


@pytest.fixture
def hub_cache(tmp_path, monkeypatch) -> Path:
    """An offline hub whose cache holds ``owner/tiny`` (main = COMMIT), a folder written by write_hf."""
    cache = tmp_path / "hub"
    monkeypatch.setattr(hub_constants, "HF_HUB_CACHE", str(cache))
    monkeypatch.setattr(hub_constants, "HF_HUB_OFFLINE", True)
    cfg = tiny_config()
    snapshot = cache / "models--owner--tiny" / "snapshots" / COMMIT
    write_hf(snapshot, models.build_detector(cfg).state_dict(), cfg.model, {1: "cat", 2: "dog"})
    (cache / "models--owner--tiny" / "refs").mkdir()
    (cache / "models--owner--tiny" / "refs" / "main").write_text(COMMIT)
    return cache


@pytest.mark.parametrize(
    ("name", "expected"),
    [
        ("SenseTime/deformable-detr", ("SenseTime/deformable-detr", None)),
        ("owner/name@v1.0", ("owner/name", "v1.0")),
        ("owner/name@" + COMMIT, ("owner/name", COMMIT)),
        ("weights/model.pth", None),  # a missing local file, not a hub model
        ("weights/model.safetensors", None),
        ("/abs/folder", None),
        ("./rel/folder", None),
        ("../rel", None),
        ("a/b/c", None),
        ("single-name", None),
    ],
)
def test_hub_ids_are_told_from_paths(name, expected) -> None:
    assert hub_id(name) == expected


def test_an_existing_local_folder_wins_over_the_hub(tmp_path, monkeypatch) -> None:
    monkeypatch.chdir(tmp_path)
    (tmp_path / "owner" / "name").mkdir(parents=True)
    assert hub_id("owner/name") is None and resolve_checkpoint("owner/name") == "owner/name"


def test_a_cached_hub_model_reads_as_its_folder(hub_cache) -> None:
    checkpoint = models.read_checkpoint("owner/tiny")
    snapshot = hub_cache / "models--owner--tiny" / "snapshots" / COMMIT
    assert checkpoint.format == "hf" and Path(checkpoint.path) == snapshot
    assert checkpoint.class_names == {1: "cat", 2: "dog"}
    direct = models.read_checkpoint(snapshot)
    assert direct.model.keys() == checkpoint.model.keys()
    assert all(torch.equal(direct.model[k], checkpoint.model[k]) for k in direct.model)
    assert models.read_checkpoint(f"owner/tiny@{COMMIT}").path == checkpoint.path  # a revision by commit


def test_a_hub_model_converts_and_predicts(hub_cache, tmp_path) -> None:
    """convert_checkpoint takes the id as its source; Predictor loads it; results land outside the cache."""
    from deformable.inference import Predictor

    out = tmp_path / "tiny.pth"
    convert_checkpoint("owner/tiny", out)
    assert models.read_checkpoint(out).class_names == {1: "cat", 2: "dog"}
    detections = Predictor("owner/tiny", threshold=0.0, device="cpu")(torch.rand(3, 64, 80))
    assert detections.boxes.shape[1] == 4 and set(detections.names) <= {"cat", "dog"}
    eval_tool = load_tool("eval")
    assert eval_tool.results_folder("owner/tiny", []) == os.path.join("runs", "eval", "owner--tiny")


def test_a_model_neither_local_nor_cached_is_named_with_the_way_on(hub_cache) -> None:
    with pytest.raises(FileNotFoundError) as info:
        models.read_checkpoint("owner/missing")
    message = str(info.value)
    assert "checkpoint owner/missing is no local file or folder" in message
    assert "Hugging Face hub model 'owner/missing'" in message and "HF_TOKEN" in message
    with pytest.raises(FileNotFoundError, match="at revision 'v9'"):
        models.read_checkpoint("owner/tiny@v9")  # no such ref in the cache


def test_a_model_saved_as_pytorch_model_bin_is_fetched_as_such(hub_cache, monkeypatch) -> None:
    """No safetensors in the first fetch: the .bin weights are asked for."""
    snapshot = hub_cache / "models--owner--tiny" / "snapshots" / COMMIT
    asked = []

    def fake(repo, revision=None, allow_patterns=None):
        asked.append(allow_patterns)
        if "*.bin" in allow_patterns:
            (bin_folder / "pytorch_model.bin").write_bytes(b"weights")
        return str(bin_folder)

    bin_folder = hub_cache / "bin"
    bin_folder.mkdir()
    shutil.copy(snapshot / "config.json", bin_folder / "config.json")
    monkeypatch.setattr(huggingface_hub, "snapshot_download", fake)
    assert resolve_checkpoint("owner/old") == str(bin_folder)
    assert asked == [["*.json", "*.safetensors"], ["*.json", "*.bin"]]
