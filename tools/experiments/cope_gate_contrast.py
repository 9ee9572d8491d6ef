"""Does a CoPE detector count with its gates? The count density on objects against the background, per attention.

    python tools/experiments/cope_gate_contrast.py --checkpoint runs/x/checkpoint.pth data.root=data/ordinal
    python tools/experiments/cope_gate_contrast.py --checkpoint runs/x/checkpoint.pth --images 48 --json out.json

On the counting probe the gates learn to open on the markers and shut between them, so the count along a row is
the number of markers passed. This measures the same for a trained detector on its validation split: for every
CoPE attention (``offset_mode="cope"``), level, head and counting channel, the mean count density (1 per pixel at
initialisation, 0 to 2) over the pixels of that level's map that lie inside a ground-truth box ("on objects") and
over the other valid pixels ("background"). A channel that counts objects has a high ratio of the two; a channel
whose gates stayed near their start has a ratio near 1. Printed per attention and level: the means over heads and
channels, and the (head, channel) with the highest ratio.

The densities are those the model computes (``CoPESampling.densities``, captured from its forward on batches of
the validation split as the evaluation prepares them: resized, normalised, padded); a pixel of a level's map is
inside a box when its centre is.
"""

from __future__ import annotations

import argparse
import json
import sys
from dataclasses import dataclass

import torch

from deformable.cope_sampling import CoPESampling
from deformable.data import DatasetError, build_dataset, collate
from models import config_and_checkpoint, load_detector
from models.checkpoint import CheckpointError
from models.config import ConfigError
from models.loading import CHECKPOINT_HELP, CONFIG_HELP, split_config_args


@dataclass
class Contrast:
    """Summed densities ``(M, R)`` and pixel counts on objects and on the background of one attention's level."""

    on: torch.Tensor | float = 0.0
    on_pixels: int = 0
    off: torch.Tensor | float = 0.0
    off_pixels: int = 0

    def add(self, density: torch.Tensor, inside: torch.Tensor, valid: torch.Tensor) -> None:
        """``density (N, h, w, M, R)``, ``inside`` / ``valid`` ``(N, h, w)`` bool."""
        on, off = density[inside & valid], density[~inside & valid]  # (K, M, R)
        self.on, self.on_pixels = self.on + on.sum(0), self.on_pixels + on.shape[0]
        self.off, self.off_pixels = self.off + off.sum(0), self.off_pixels + off.shape[0]

    def summary(self) -> dict[str, float | list[int]]:
        on = torch.as_tensor(self.on, dtype=torch.float64) / max(self.on_pixels, 1)
        off = torch.as_tensor(self.off, dtype=torch.float64) / max(self.off_pixels, 1)
        ratio = on / off.clamp_min(1e-3)
        head, channel = divmod(int(ratio.argmax()), ratio.shape[-1]) if ratio.dim() == 2 else (0, 0)
        return {
            "on_objects": float(on.mean()),
            "background": float(off.mean()),
            "best_head_channel": [head, channel],
            "best_on_objects": float(on[head, channel]) if on.dim() == 2 else float(on),
            "best_background": float(off[head, channel]) if off.dim() == 2 else float(off),
            "best_ratio": float(ratio[head, channel]) if ratio.dim() == 2 else float(ratio),
        }


def inside_boxes(targets: list[dict], mask: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    """``(N, h, w)`` bool: the pixels of an ``h x w`` level map whose centres lie inside a target box. Boxes are
    normalised ``(cx, cy, w, h)`` of each image's valid region; ``mask (N, H, W)`` is True at padding."""
    n, (h, w) = len(targets), size
    height, width = mask.shape[-2:]
    ys = (torch.arange(h, dtype=torch.float64) + 0.5) / h * height  # level pixel centres in padded-image pixels
    xs = (torch.arange(w, dtype=torch.float64) + 0.5) / w * width
    out = torch.zeros(n, h, w, dtype=torch.bool)
    for i, target in enumerate(targets):
        valid_h, valid_w = int((~mask[i]).any(1).sum()), int((~mask[i]).any(0).sum())
        for cx, cy, bw, bh in target["boxes"].double().tolist():
            x0, x1 = (cx - bw / 2) * valid_w, (cx + bw / 2) * valid_w
            y0, y1 = (cy - bh / 2) * valid_h, (cy + bh / 2) * valid_h
            out[i] |= ((ys >= y0) & (ys <= y1))[:, None] & ((xs >= x0) & (xs <= x1))[None, :]
    return out


@torch.no_grad()
def measure(model: torch.nn.Module, dataset, images: int, batch_size: int = 4) -> dict[tuple[str, int], Contrast]:
    """(attention name, level) -> :class:`Contrast` over the first ``images`` images of ``dataset``."""
    captured: list[tuple[str, CoPESampling, tuple]] = []
    hooks = [
        module.register_forward_pre_hook(lambda mod, args, name=name: captured.append((name, mod, args)))
        for name, module in model.named_modules()
        if isinstance(module, CoPESampling)
    ]
    if not hooks:
        raise ValueError("the model has no CoPE attention (model.enc_offset_mode / model.dec_offset_mode are linear)")
    results: dict[tuple[str, int], Contrast] = {}
    try:
        for start in range(0, min(images, len(dataset)), batch_size):
            batch, mask, targets = collate([dataset[i] for i in range(start, min(start + batch_size, images))])
            captured.clear()
            model(batch, mask)
            for name, module, (_, _, _, values, shapes, padding) in captured:
                levels = [(int(h), int(w)) for h, w in shapes]
                offset = 0
                for level, density in enumerate(module.densities(values, levels, padding, torch.float64)):
                    n, h, w = density.shape[:3]
                    valid = torch.ones(n, h, w, dtype=torch.bool)
                    if padding is not None:
                        valid = ~padding[:, offset : offset + h * w].view(n, h, w)
                    attention = name.removeprefix("transformer.").removesuffix(".cope")
                    contrast = results.setdefault((attention, level), Contrast())
                    contrast.add(density, inside_boxes(targets, mask, (h, w)), valid)
                    offset += h * w
    finally:
        for hook in hooks:
            hook.remove()
    return results


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--checkpoint", required=True, help=CHECKPOINT_HELP)
    parser.add_argument("--images", type=int, default=24, help="validation images to measure on (default 24)")
    parser.add_argument("--json", help="also write the figures to this JSON file")
    parser.add_argument("args", nargs="*", help=CONFIG_HELP)
    args = parser.parse_args(argv)
    if args.images < 1:
        parser.error(f"--images must be >= 1, got {args.images}")
    try:
        config, overrides = split_config_args(args.args)
        cfg, checkpoint = config_and_checkpoint(config, overrides, args.checkpoint)
        model, _ = load_detector(cfg, checkpoint)
        results = measure(model, build_dataset(cfg.data, "val"), args.images)
    except (CheckpointError, ConfigError, DatasetError, FileNotFoundError, ValueError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    print(f"{'attention':28s} level  on objects  background  ratio | best (head, channel): on / background = ratio")
    table = []
    for (attention, level), contrast in results.items():
        row = contrast.summary()
        table.append({"attention": attention, "level": level, **row})
        head, channel = row["best_head_channel"]
        print(
            f"{attention:28s} {level:5d}  {row['on_objects']:10.3f}  {row['background']:10.3f}  "
            f"{row['on_objects'] / max(row['background'], 1e-3):5.2f} | ({head}, {channel}): "
            f"{row['best_on_objects']:.2f} / {row['best_background']:.3f} = {row['best_ratio']:.1f}"
        )
    if args.json:
        with open(args.json, "w", encoding="utf-8") as f:
            json.dump(table, f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
