"""Checkpoints named by their Hugging Face hub id (``SenseTime/deformable-detr``, ``owner/name@revision``).

Wherever a checkpoint path is read (every tool's ``--checkpoint``, ``train.finetune``, :class:`Predictor`,
:func:`models.read_checkpoint`), a name that is no local file or folder and has the form of a hub model id is
fetched with ``huggingface_hub.snapshot_download`` (installed with timm) into the hub's cache, and the snapshot
folder is read as any transformers folder. Only the files the reader needs are fetched: ``*.json`` and
``*.safetensors``, or ``*.bin`` where a model has no safetensors. ``HF_HUB_OFFLINE=1`` reads the cache only;
``HF_TOKEN`` reaches private or gated models; ``HF_HUB_CACHE`` moves the cache.
"""

from __future__ import annotations

import os
import re

# owner/name with an optional @revision (a branch, tag or commit): the hub's id grammar, which no file suffix fits.
HUB_ID = re.compile(r"^(?P<repo>[A-Za-z0-9][\w.-]*/[A-Za-z0-9][\w.-]*)(?:@(?P<revision>[\w./-]+))?$")
WEIGHT_SUFFIXES = (".pth", ".pt", ".bin", ".safetensors", ".ckpt", ".pkl", ".json", ".yaml")  # local files, surely


def hub_id(path: str | os.PathLike) -> tuple[str, str | None] | None:
    """``(repo_id, revision)`` when ``path`` is no existing file or folder and reads as a hub model id (not a file
    name with a weights suffix, not a path starting with ``.`` or ``/``); else None."""
    path = os.fspath(path)
    if os.path.exists(path) or path.lower().endswith(WEIGHT_SUFFIXES):
        return None
    found = HUB_ID.match(path)
    if found is None or found.group("repo").split("/")[0] in (".", ".."):
        return None
    return found.group("repo"), found.group("revision")


def resolve_checkpoint(path: str | os.PathLike) -> str:
    """``path`` itself when it exists or is no hub id; else the local snapshot folder of that hub model, downloaded
    into the hub cache when it is not there yet.

    Raises:
        FileNotFoundError: a hub id that cannot be fetched (no such model or revision, a gated or private one
            without a token, offline and not cached), with the hub's reason and how to get the files.
    """
    path = os.fspath(path)
    found = hub_id(path)
    if found is None:
        return path
    repo, revision = found
    from huggingface_hub import snapshot_download  # a dependency of timm

    def fetch(patterns: list[str]) -> str:
        try:
            return snapshot_download(repo, revision=revision, allow_patterns=patterns)
        except Exception as exc:  # the hub's errors (not found, gated, offline, HTTP) share no base class
            reason = f"{type(exc).__name__}: {str(exc).splitlines()[0][:300] if str(exc) else 'no message'}"
            raise FileNotFoundError(
                f"checkpoint {path} is no local file or folder, and fetching it as the Hugging Face hub model "
                f"{repo!r}{f' at revision {revision!r}' if revision else ''} failed ({reason}). Check the name, "
                "set HF_TOKEN for a private or gated model, or download the folder where the hub is reachable "
                "(huggingface-cli download ID --local-dir DIR) and pass DIR"
            ) from exc

    folder = fetch(["*.json", "*.safetensors"])
    if not any(name.endswith(".safetensors") for name in os.listdir(folder)):
        folder = fetch(["*.json", "*.bin"])  # an older model saved as pytorch_model.bin
    return folder
