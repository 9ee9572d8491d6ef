"""Deployment: the detector as ``images -> (pred_logits, pred_boxes)``, exported with ``torch.export`` (native op) or
to ONNX (the op's PyTorch path, GridSample), with dynamic batch and image size.

    model = load_for_export(cfg, "checkpoint.pth")
    program = export_program(model, example_images(2, 512, 640))   # torch.export.save(program, "model.pt2")
    export_onnx(model, "model.onnx", example_images(2, 512, 640))
    onnx_max_difference("model.onnx", model, torch.randn(1, 3, 480, 704))

The exported graphs take unpadded images only (no mask input): batch images of one size, or run them one by one.
"""

from __future__ import annotations

import copy
import importlib.util
import logging
import os
import warnings
import weakref
from collections.abc import Callable
from typing import TYPE_CHECKING

import torch
from torch import nn

import deformable

from .checkpoint import Checkpoint
from .config import Config
from .files import atomic_save
from .loading import load_detector

if TYPE_CHECKING:
    import onnx_ir
    import onnxruntime

INPUT_NAMES = ["images"]
OUTPUT_NAMES = ["pred_logits", "pred_boxes"]
DEFAULT_OPSET = 18
# The dynamo exporter writes opset 18; converting down fails (LayerNormalization-17, Split-18 attributes).
MIN_OPSET = 18
CONVERTER_MAX = 25  # onnxscript 0.7.2: the newest opset its version converter writes (converter_max)


def check_opset(opset: int) -> None:
    """Refuses an ONNX opset the exporter cannot write, before the export: below :data:`MIN_OPSET`, above the newest
    the installed ``onnx`` knows, or above the newest onnxscript's version converter reaches (:func:`converter_max`);
    either way the conversion would fail after the whole export, falling back to opset 18.

    Raises:
        ValueError: naming the opset and the range that works.
    """
    if opset < MIN_OPSET:
        raise ValueError(
            f"opset {opset} is not supported: the exporter writes opset {MIN_OPSET}+ (GridSample needs 16, but "
            f"converting the graph below 18 fails); use --opset {MIN_OPSET} or higher"
        )
    if importlib.util.find_spec("onnx") is None:
        return
    import onnx

    newest, reach = onnx.defs.onnx_opset_version(), converter_max()
    if opset > newest:
        raise ValueError(
            f"opset {opset} is not supported: the installed onnx {onnx.__version__} knows opsets up to {newest}; "
            f"use --opset {MIN_OPSET}..{min(newest, reach)}"
        )
    if opset > reach:
        raise ValueError(
            f"opset {opset} is not supported: the exporter's graph (opset {MIN_OPSET}) is converted by onnxscript's "
            f"version converter, which reaches opset {reach}; above it onnx's own converter is used, and it has no "
            f"step past opset 22 for the decoder's Attention; use --opset {MIN_OPSET}..{reach}"
        )


def converter_max() -> int:
    """The newest opset that ``torch.onnx.export`` converts a detector to: onnxscript's version converter's
    (``SUPPORTED_MAX_ONNX_OPSET``, 25 in onnxscript 0.7.2; read where that private name exists). Above it the exporter
    falls back to onnx's C++ converter, which fails on the ``Attention`` node of the decoder's ``nn.MultiheadAttention``
    (onnx 1.23.2: no adapter from opset 22 to 23), measured for opsets 26-28."""
    try:
        from onnxscript.version_converter import _version_converter
    except ImportError:
        return CONVERTER_MAX
    return int(getattr(_version_converter, "SUPPORTED_MAX_ONNX_OPSET", CONVERTER_MAX))


class ExportableDetector(nn.Module):
    """Wraps a detector for export: ``images (B, 3, H, W)`` normalised, unpadded -> ``(pred_logits, pred_boxes)``.

    Outputs: ``pred_logits (B, Q, num_classes)`` class logits (sigmoid gives the scores) and ``pred_boxes (B, Q, 4)``
    normalised ``(cx, cy, w, h)`` in [0, 1] relative to the image; the last decoder layer's only (no auxiliary outputs).
    """

    def __init__(self, detector: nn.Module) -> None:
        super().__init__()
        self.detector = detector
        self.train(detector.training)

    def forward(self, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        out = self.detector(images)
        return out["pred_logits"], out["pred_boxes"]


def load_for_export(cfg: Config, checkpoint: str | os.PathLike | Checkpoint | None) -> nn.Module:
    """The detector of ``cfg.model`` in eval mode on the CPU with the weights of ``checkpoint`` (any format
    :func:`models.read_checkpoint` reads), which must fit the config exactly, class heads included. Without one the
    weights are random (a warning says so): for testing only. The backbone is never downloaded.

    Raises:
        FileNotFoundError: no such checkpoint. CheckpointError: unreadable, or another architecture or class count.
    """
    if checkpoint is None:
        warnings.warn("no checkpoint given: exporting random weights (useful for testing only)", stacklevel=2)
    return load_detector(cfg, checkpoint)[0]


def example_images(batch: int = 2, height: int = 512, width: int = 640, seed: int = 0) -> torch.Tensor:
    """Random normalised images ``(batch, 3, height, width)`` to trace with; batch >= 2 keeps the batch dynamic."""
    generator = torch.Generator().manual_seed(seed)
    return torch.randn(batch, 3, height, width, generator=generator)


EXPORT_TORCH = (2, 8)  # the first release whose torch.export.Dim.DYNAMIC takes a minimum


def check_export_torch() -> None:
    """Raises ValueError naming the installed torch when it lacks what both exports need, ``Dim.DYNAMIC`` with a
    minimum (torch :data:`EXPORT_TORCH`; the package itself runs from torch 2.7). The feature is tried rather than the
    version compared: a pre-release 2.8 build (``2.8.0a0+...``, as NVIDIA's containers ship) has it."""
    try:
        torch.export.Dim.DYNAMIC(min=2)
    except (AttributeError, TypeError):  # 2.4-2.5: no DYNAMIC; 2.6-2.7: a hint that takes no minimum
        wanted = ".".join(map(str, EXPORT_TORCH))
        raise ValueError(
            f"exporting needs torch >= {wanted} (dynamic image sides with a minimum); this is torch "
            f"{torch.__version__}: pip install 'torch>={wanted}'"
        ) from None


def dynamic_shapes(min_side: int) -> dict[str, dict[int, object]]:
    """``torch.export`` dynamic shapes of ``images``: batch from 1, height and width from ``min_side`` (the model's
    :func:`min_export_side`). The minimum is stated rather than left to the tracer: below it a two-stage model's
    proposal count fails a guard on the sum of its level sizes, which the program would report as that formula;
    a stated minimum fails as ``images.size()[2] >= N``."""
    check_export_torch()
    side = torch.export.Dim.DYNAMIC(min=min_side)
    return {"images": {0: torch.export.Dim("batch", min=1), 2: side, 3: side}}


class FeatureLevels:
    """The side (pixels) of each feature level of a detector for an image side, measured: its backbone run on meta
    tensors (shapes only: nothing computed, its weights untouched), then each extra level's padded 3x3 stride-2
    convolution (``n -> ceil(n / 2)``). Measured rather than derived from the strides because backbones round
    differently: a ResNet's padded stride-2 steps map ``n`` to ``ceil(n / 2)``, timm's ConvNeXt (an unpadded 4x4
    stem, 2x2 downsampling) to ``floor(n / 4)`` and ``floor(n / 2)``. Height and width are treated alike.
    """

    def __init__(self, model: nn.Module) -> None:
        self.body = copy.deepcopy(model.backbone[0]).to("meta").eval()
        self.levels = int(model.num_feature_levels)
        self.measured: dict[int, list[int]] = {}

    def sides(self, side: int) -> list[int]:
        """Each level's side, finest first, for an image side ``side``; zeros where the backbone cannot take it."""
        if side not in self.measured:
            images = torch.empty(1, 3, side, side, device="meta")
            try:
                with torch.no_grad():
                    maps = self.body(images, torch.zeros(1, side, side, dtype=torch.bool, device="meta"))
                sides = [int(x.shape[-1]) for x, _ in maps]
            except RuntimeError:  # smaller than a kernel of the backbone
                sides = [0]
            while len(sides) < self.levels:
                sides.append(-(-sides[-1] // 2))
            self.measured[side] = sides
        return self.measured[side]

    def positions(self, height: int, width: int) -> int:
        """The encoder's positions for a ``height`` x ``width`` image: one per pixel of every level."""
        return sum(h * w for h, w in zip(self.sides(height), self.sides(width), strict=True))

    def smallest_side(self, enough: Callable[[int], bool]) -> int:
        """The smallest side for which ``enough(side)`` holds; ``enough`` must hold for every larger side too (the
        level sides grow with the image's)."""
        low, high = 0, 16  # enough(high); not enough(low), or low 0
        while not enough(high):
            low, high = high, high * 2
        while high - low > 1:
            middle = (low + high) // 2
            low, high = (low, middle) if enough(middle) else (middle, high)
        return high


_LEVELS: weakref.WeakKeyDictionary[nn.Module, FeatureLevels] = weakref.WeakKeyDictionary()


def feature_levels(model: nn.Module) -> FeatureLevels:
    """The :class:`FeatureLevels` of the detector ``model``, measured once per model."""
    if model not in _LEVELS:
        _LEVELS[model] = FeatureLevels(model)
    return _LEVELS[model]


def min_image_side(model: nn.Module) -> int:
    """The smallest image side (pixels) that an export of the detector ``model`` with dynamic height and width can be
    traced at: every feature level at least 2 pixels. ``torch.export`` specialises a size that is 1 while tracing
    (0/1 sizes cannot stay symbolic): traced at 64 px, a 4-level ResNet model's program takes sides 33..64 only. So
    e.g. 33 px with 3 levels (or 1) and 65 with the default 4 on a ResNet; 96 with 4 on timm's ConvNeXt."""
    levels = feature_levels(model)
    return levels.smallest_side(lambda side: min(levels.sides(side)) >= 2)


def min_two_stage_side(model: nn.Module) -> int:
    """The smallest square image side whose encoder has at least ``model.num_queries`` positions (a two-stage
    detector's proposals: with fewer it cannot select them); e.g. 113 px for 300 queries with the default 4 levels of
    a ResNet (309 positions; 265 at 112 px), 128 on timm's ConvNeXt. The positions grow with either side, so every
    larger size has enough too."""
    levels, queries = feature_levels(model), int(model.num_queries)
    return levels.smallest_side(lambda side: levels.positions(side, side) >= queries)


def min_export_side(model: nn.Module) -> int:
    """The smallest height and width an export of ``model`` (a detector) accepts: :func:`min_image_side`, and for a
    two-stage model at least :func:`min_two_stage_side` (a square range: some narrower sizes have enough positions,
    e.g. 96x400 for 300 queries, but no smaller minimum per side holds for every size above it)."""
    side = min_image_side(model)
    if getattr(model, "two_stage", False):
        side = max(side, min_two_stage_side(model))
    return side


def export_size_reason(model: nn.Module) -> str:
    """Why :func:`min_export_side` is what it is, for the line stating an export's accepted sizes."""
    side = min_export_side(model)
    if side == min_image_side(model):
        return "every feature level at least 2 px"
    positions = feature_levels(model).positions(side, side)
    return (
        f"two-stage: its num_queries={model.num_queries} proposals need as many encoder positions, {positions} at "
        f"{side}x{side}"
    )


def check_export_size(height: int, width: int, model: nn.Module) -> None:
    """Refuses an example size that an export cannot trace with dynamic height and width, before the minutes an
    export takes: a side below :func:`min_export_side` of ``model`` (a detector).

    Raises:
        ValueError: naming the size, the minimum and why.
    """
    levels = feature_levels(model)
    minimum = min_image_side(model)
    if min(height, width) < minimum:
        below = levels.sides(minimum - 1)
        raise ValueError(
            f"example size {height}x{width} (--size H W) is too small: each side must be at least {minimum} px for "
            f"this model. Its feature levels would be {below} px a side at {minimum - 1} px, and torch.export "
            f"specialises the graph to a 1-px map, so the program would not take larger images (height and width "
            f"stay dynamic only when every level is at least 2 px; {levels.sides(minimum)} at {minimum} px)"
        )
    minimum = min_export_side(model)
    if min(height, width) < minimum:
        queries, below = int(model.num_queries), minimum - 1
        raise ValueError(
            f"example size {height}x{width} (--size H W) is too small for this two-stage model: each side must be "
            f"at least {minimum} px. It selects num_queries={queries} proposals among the encoder's positions (one "
            f"per pixel of every feature level), and {minimum}x{minimum} is the smallest square with enough "
            f"({levels.positions(minimum, minimum)}; {below}x{below} has {levels.positions(below, below)}), so the "
            f"exported program takes height and width from {minimum} px ({height}x{width} has "
            f"{levels.positions(height, width)} positions)"
        )


def has_cope(model: nn.Module) -> bool:
    """True when ``model`` has CoPE offsets (``offset_mode="cope"``): where gates are nearly closed a count moves a
    point far, so the native and the PyTorch path's rounding differences can show as large ones; compare an ONNX
    file with the PyTorch path it was exported from."""
    return any(getattr(m, "offset_mode", "linear") == "cope" for m in model.modules())


def export_program(model: nn.Module, images: torch.Tensor) -> torch.export.ExportedProgram:
    """``torch.export`` of ``ExportableDetector(model)`` with the native op (through its fake kernel) where built.

    Args:
        model: the detector, in eval mode.
        images: ``(B, 3, H, W)`` example input, ``B >= 2``.

    Returns:
        An ExportedProgram with dynamic batch, and height and width from :func:`min_export_side` (CoPE offsets
        included); ``program.module()(images)`` returns ``(pred_logits, pred_boxes)``; save it with
        ``torch.export.save``.

    Raises:
        ValueError: ``images`` smaller than :func:`min_export_side` (the program would not be dynamic, or a
            two-stage model would have fewer encoder positions than queries).
    """
    check_export_size(*images.shape[-2:], model)
    shapes = dynamic_shapes(min_export_side(model))
    with torch.no_grad():
        return torch.export.export(ExportableDetector(model), (images,), dynamic_shapes=shapes)


def input_ranges(program: torch.export.ExportedProgram) -> dict[str, tuple[int, int | float]]:
    """``{"batch": (lo, hi), "height": ..., "width": ...}``: the input sizes an exported program accepts."""
    (placeholder,) = [n for n in program.graph.nodes if n.op == "placeholder" and n.name == INPUT_NAMES[0]]
    ranges = {}
    for name, size in zip(("batch", "channels", "height", "width"), placeholder.meta["val"].shape, strict=True):
        if isinstance(size, torch.SymInt):
            bounds = program.range_constraints[size.node.expr]
            upper = int(bounds.upper) if bounds.upper.is_Integer else float("inf")  # unbounded: sympy's int_oo
            ranges[name] = (int(bounds.lower), upper)
    return ranges


def export_onnx(
    model: nn.Module, path: str | os.PathLike, images: torch.Tensor, opset: int = DEFAULT_OPSET
) -> torch.onnx.ONNXProgram:
    """Writes ``ExportableDetector(model)`` to ONNX with the dynamo exporter, the attention through its PyTorch path.

    Input ``images (batch, 3, height, width)``, outputs ``pred_logits`` and ``pred_boxes``, all three sizes
    symbolic (CoPE offsets included). Weights go into the file
    (a ``.data`` file beside it only above 2 GB). The graph is optimised by :func:`optimize_onnx`, not by the
    exporter (BENCHMARKS.md, "Deployment latency": the same graph in half the time for a CoPE model).

    Args:
        model: the detector, in eval mode.
        path: the ``.onnx`` file.
        images: ``(B, 3, H, W)`` example input, ``B >= 2``.
        opset: ONNX opset, at least 18.

    Returns:
        The ``torch.onnx.ONNXProgram``, already saved.

    Raises:
        ValueError: an opset below 18, an example size below :func:`min_export_side`, or the exporter wrote another
            opset than asked for.
        ImportError: onnx or onnxscript (which the exporter needs) is not installed.
    """
    check_opset(opset)
    check_export_size(*images.shape[-2:], model)
    missing = [name for name in ("onnx", "onnx_ir", "onnxscript") if importlib.util.find_spec(name) is None]
    if missing:
        raise ImportError(f"ONNX export needs {', '.join(missing)}: pip install '.[export]'")
    axes = {0: "batch", 2: "height", 3: "width"}
    with deformable.backend("pytorch"), torch.no_grad():
        program = torch.onnx.export(
            ExportableDetector(model),
            (images,),
            input_names=INPUT_NAMES,
            output_names=OUTPUT_NAMES,
            opset_version=opset,
            dynamic_shapes={"images": axes},
            dynamo=True,
            verbose=False,
            optimize=False,
        )
    optimize_onnx(program.model)
    written = {entry.domain: entry.version for entry in program.model_proto.opset_import}.get("", 0)
    if written != opset:  # the exporter falls back to its own opset when conversion fails, with only a log line
        raise ValueError(f"asked for ONNX opset {opset}, the exporter wrote opset {written}")
    atomic_save(path, program.save)  # a failed or killed save leaves no torn file (nor a stray .data beside it)
    return program


def optimize_onnx(model: onnx_ir.Model) -> None:
    """Optimises an exported graph in place with onnxscript's optimiser (constant folding, pattern rewrites, common
    subexpressions, constants as initializers), after a first pass that folds the shape arithmetic and merges
    repeated subexpressions: that pass shrinks a CoPE graph's many index and shape nodes first, where the optimiser
    run on the raw graph (the exporter's default) spends minutes in its pattern matcher."""
    import onnx_ir
    import onnxscript.optimizer
    from onnx_ir.passes import common

    # Its constant folder warns once per multi-output node it leaves alone (Split): expected, nothing to act on.
    folding_log = logging.getLogger("onnxscript.optimizer._constant_folding")
    level = folding_log.level
    folding_log.setLevel(logging.ERROR)
    try:
        onnx_ir.passes.Sequential(common.InlinePass(), common.RemoveUnusedNodesPass())(model)
        onnxscript.optimizer.fold_constants(model)
        onnx_ir.passes.Sequential(
            common.RemoveUnusedNodesPass(), common.CommonSubexpressionEliminationPass(), common.RemoveUnusedNodesPass()
        )(model)
        onnxscript.optimizer.optimize_ir(model)
    finally:
        folding_log.setLevel(level)


def check_onnx(path: str | os.PathLike) -> None:
    """``onnx.checker`` on the file (by path, so that models above 2 GB work); raises on an invalid model."""
    import onnx

    onnx.checker.check_model(os.fspath(path), full_check=True)


def onnx_session(path: str | os.PathLike, threads: int = 0) -> onnxruntime.InferenceSession:
    """An onnxruntime CPU session of ``path``; ``threads`` intra-op threads (0: onnxruntime's default)."""
    import onnxruntime

    options = onnxruntime.SessionOptions()
    options.intra_op_num_threads = threads
    return onnxruntime.InferenceSession(os.fspath(path), options, providers=["CPUExecutionProvider"])


def onnx_max_difference(
    session_or_path: onnxruntime.InferenceSession | str | os.PathLike, model: nn.Module, images: torch.Tensor
) -> dict[str, float]:
    """Runs the ONNX model (a path or an onnxruntime session) and the PyTorch detector on the same unpadded
    ``images (B, 3, H, W)``; returns the largest absolute difference of each output, by name."""
    session = onnx_session(session_or_path) if isinstance(session_or_path, (str, os.PathLike)) else session_or_path
    with torch.no_grad():
        expected = ExportableDetector(model)(images)
    got = session.run(OUTPUT_NAMES, {INPUT_NAMES[0]: images.numpy()})
    pairs = zip(OUTPUT_NAMES, got, expected, strict=True)
    return {name: float((torch.from_numpy(g) - e).abs().max()) for name, g, e in pairs}
