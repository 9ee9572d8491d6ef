"""Deformable DETR: backbone -> input projections -> deformable transformer -> class and box heads."""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch
from torch import nn

from .backbone import Joiner, build_backbone, resize_mask
from .config import Config, ConfigError
from .deformable_decoder import refine_boxes
from .deformable_transformer import DeformableTransformer, build_transformer
from .heads import make_heads

if TYPE_CHECKING:
    from .training_queries import ExtraQueries


def input_projections(num_channels: list[int], hidden_dim: int, num_feature_levels: int) -> nn.ModuleList:
    """Conv1x1 + GroupNorm(32) per backbone map; then Conv3x3 stride 2 + GroupNorm(32) per extra level (the first on
    the last backbone map, later ones on the previous extra level)."""
    projections = [
        nn.Sequential(nn.Conv2d(c, hidden_dim, kernel_size=1), nn.GroupNorm(32, hidden_dim)) for c in num_channels
    ]
    in_channels = num_channels[-1]
    for _ in range(num_feature_levels - len(num_channels)):
        projections.append(
            nn.Sequential(
                nn.Conv2d(in_channels, hidden_dim, kernel_size=3, stride=2, padding=1), nn.GroupNorm(32, hidden_dim)
            )
        )
        in_channels = hidden_dim
    for proj in projections:
        nn.init.xavier_uniform_(proj[0].weight, gain=1)
        nn.init.constant_(proj[0].bias, 0)
    return nn.ModuleList(projections)


class DeformableDETR(nn.Module):
    """The Deformable DETR detector (single-/multi-scale, iterative box refinement, two-stage).

    Its state_dict has exactly the original's keys: the heads are ModuleLists of ``dec_layers`` (+1 in two-stage)
    entries, the same module repeated when shared, and with box refinement (two-stage) the box (class) heads are
    also registered as ``transformer.decoder.bbox_embed`` (``transformer.decoder.class_embed``).

    Args:
        backbone: a ``Joiner`` (feature maps, masks, position encodings).
        transformer: the ``DeformableTransformer``.
        num_classes: class logits per query (sigmoid, no "no object" class).
        num_queries: queries (and two-stage proposals).
        num_feature_levels: levels; those beyond the backbone's maps are extra stride-2 levels.
        aux_loss: also return the predictions of the earlier decoder layers.
        with_box_refine: one head pair per decoder layer, each refining the previous layer's boxes.
        two_stage: queries from the top-scoring encoder proposals.
    """

    def __init__(
        self,
        backbone: Joiner,
        transformer: DeformableTransformer,
        num_classes: int,
        num_queries: int,
        num_feature_levels: int,
        aux_loss: bool = True,
        with_box_refine: bool = False,
        two_stage: bool = False,
    ) -> None:
        super().__init__()
        if num_feature_levels < len(backbone.num_channels):
            raise ValueError(
                f"num_feature_levels={num_feature_levels} is fewer than the backbone's "
                f"{len(backbone.num_channels)} maps"
            )
        hidden_dim = transformer.d_model
        self.num_queries = num_queries
        self.num_feature_levels = num_feature_levels
        self.aux_loss = aux_loss
        self.with_box_refine = with_box_refine
        self.two_stage = two_stage
        self.transformer = transformer
        num_dec_layers = len(transformer.decoder.layers)
        num_pred = num_dec_layers + 1 if two_stage else num_dec_layers
        self.class_embed, self.bbox_embed = make_heads(
            hidden_dim, num_classes, num_pred, shared=not with_box_refine, two_stage=two_stage
        )
        if with_box_refine:
            self.transformer.decoder.bbox_embed = self.bbox_embed
        if two_stage:
            self.transformer.decoder.class_embed = self.class_embed
        else:
            self.query_embed = nn.Embedding(num_queries, hidden_dim * 2)
        self.input_proj = input_projections(backbone.num_channels, hidden_dim, num_feature_levels)
        self.backbone = backbone

    def forward(
        self, images: torch.Tensor, mask: torch.Tensor | None = None, extra: ExtraQueries | None = None
    ) -> dict:
        """Detects objects.

        Args:
            images: ``(B, 3, H, W)`` float, normalised (ImageNet mean/std), zero where padded.
            mask: ``(B, H, W)`` bool, True at padding; None: no padding.
            extra: training only: E extra queries (``models.training_queries.QueryAids.make``) decoded after the
                matching ones, which never attend to them; None (inference): the original's detector.

        Returns:
            dict with
            - ``pred_logits`` ``(B, Q, num_classes)``: class logits (sigmoid scores).
            - ``pred_boxes`` ``(B, Q, 4)``: boxes ``(cx, cy, w, h)`` in [0, 1] relative to each image's valid
              (unpadded) region, i.e. to the image size before padding.
            - ``aux_outputs`` (when aux_loss): list of ``dec_layers - 1`` dicts with the same two keys, earlier
              decoder layers first.
            - ``enc_outputs`` (two-stage): dict with ``pred_logits (B, S, num_classes)`` and ``pred_boxes (B, S, 4)``,
              the proposal of every encoder position (S = sum of the levels' H_l * W_l).
            - with ``extra`` only: ``extra_outputs``, a list (every decoder layer with aux_loss, else the last one;
              the last layer last) of dicts with ``pred_logits (B, E, num_classes)`` and ``pred_boxes (B, E, 4)``
              of the extra queries, and ``extra_layout`` (``extra.layout``); the keys above keep the matching
              queries only.
        """
        mask = self._check_inputs(images, mask)
        srcs, masks, pos = self._levels(images, mask)
        enc_heads = (self.class_embed[-1], self.bbox_embed[-1]) if self.two_stage else None
        query_embed = None if self.two_stage else self.query_embed.weight
        t = self.transformer(srcs, masks, pos, query_embed, enc_heads, extra=extra)
        classes, boxes = self._predictions(t)
        if extra is None:
            return self._outputs(classes, boxes, t)
        num_matching = t["hs"].shape[2] - extra.layout.num_extra
        layers = range(len(classes)) if self.aux_loss else [len(classes) - 1]
        extra_outputs = [
            {"pred_logits": classes[i][:, num_matching:], "pred_boxes": boxes[i][:, num_matching:]} for i in layers
        ]
        classes = [c[:, :num_matching] for c in classes]
        boxes = [b[:, :num_matching] for b in boxes]
        return {**self._outputs(classes, boxes, t), "extra_outputs": extra_outputs, "extra_layout": extra.layout}

    def _predictions(self, t: dict[str, torch.Tensor]) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
        """Per decoder layer ``(B, Q, num_classes)`` class logits and ``(B, Q, 4)`` boxes from the transformer's
        outputs, each layer's boxes relative to its input reference."""
        classes, boxes = [], []
        for lvl in range(t["hs"].shape[0]):
            reference = t["init_reference"] if lvl == 0 else t["inter_references"][lvl - 1]
            classes.append(self.class_embed[lvl](t["hs"][lvl]))
            boxes.append(refine_boxes(self.bbox_embed[lvl](t["hs"][lvl]), reference))
        return classes, boxes

    def _outputs(self, classes: list[torch.Tensor], boxes: list[torch.Tensor], t: dict[str, torch.Tensor]) -> dict:
        """``pred_logits``, ``pred_boxes``, ``aux_outputs`` and ``enc_outputs`` (see :meth:`forward`)."""
        out = {"pred_logits": classes[-1], "pred_boxes": boxes[-1]}
        if self.aux_loss:
            out["aux_outputs"] = [
                {"pred_logits": c, "pred_boxes": b} for c, b in zip(classes[:-1], boxes[:-1], strict=True)
            ]
        if self.two_stage:
            out["enc_outputs"] = {
                "pred_logits": t["enc_outputs_class"],
                "pred_boxes": t["enc_outputs_coord_unact"].sigmoid(),
            }
        return out

    def _levels(
        self, images: torch.Tensor, mask: torch.Tensor
    ) -> tuple[list[torch.Tensor], list[torch.Tensor], list[torch.Tensor]]:
        """Projected features, masks and position encodings of every level (backbone maps, then extra levels)."""
        features, masks, pos = self.backbone(images, mask)
        srcs = [proj(x) for proj, x in zip(self.input_proj, features, strict=False)]
        for lvl in range(len(features), self.num_feature_levels):
            src = self.input_proj[lvl](features[-1] if lvl == len(features) else srcs[-1])
            level_mask = resize_mask(mask, src.shape[-2:])
            srcs.append(src)
            masks.append(level_mask)
            pos.append(self.backbone[1](src, level_mask).to(src.dtype))
        return srcs, masks, pos

    @staticmethod
    def _check_inputs(images: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
        """Validates the inputs; returns the mask (all False when None)."""
        if not isinstance(images, torch.Tensor):
            raise TypeError(f"images must be a torch.Tensor of shape (B, 3, H, W), got {type(images).__name__}")
        if not images.is_floating_point():
            raise TypeError(f"images must be a floating-point tensor (normalised), got dtype {images.dtype}")
        if images.dim() != 4 or images.shape[1] != 3:
            raise ValueError(f"images must have shape (B, 3, H, W), got {tuple(images.shape)}")
        b, _, h, w = images.shape
        if mask is None:
            return torch.zeros((b, h, w), dtype=torch.bool, device=images.device)
        if not isinstance(mask, torch.Tensor) or mask.dtype != torch.bool:
            raise TypeError(f"mask must be a bool tensor (True = padding), got {getattr(mask, 'dtype', type(mask))}")
        if tuple(mask.shape) != (b, h, w):
            raise ValueError(
                f"mask must have shape (B, H, W) = {(b, h, w)} to match the images, got {tuple(mask.shape)}"
            )
        if mask.device != images.device:
            raise ValueError(f"mask is on {mask.device} but images are on {images.device}")
        return mask


def build_detector(cfg: Config) -> DeformableDETR:
    """Builds the detector described by ``cfg.model``; nothing is downloaded unless ``pretrained_backbone``."""
    m = cfg.model
    if m.hidden_dim % 32 != 0:
        raise ConfigError(
            f"model.hidden_dim must be a multiple of 32 (GroupNorm(32) in the input projections), got {m.hidden_dim}"
        )
    if m.num_classes < 1 or m.num_queries < 1 or m.dec_layers < 1:
        raise ConfigError(
            f"model.num_classes, num_queries and dec_layers must be positive, got {m.num_classes}, "
            f"{m.num_queries}, {m.dec_layers}"
        )
    try:
        backbone = build_backbone(cfg)
        transformer = build_transformer(cfg)
    except ConfigError:
        raise
    except ValueError as exc:  # what the builders refuse is the config's doing: say so, as the tools report it
        raise ConfigError(str(exc)) from exc
    return DeformableDETR(
        backbone,
        transformer,
        num_classes=m.num_classes,
        num_queries=m.num_queries,
        num_feature_levels=m.num_feature_levels,
        aux_loss=m.aux_loss,
        with_box_refine=m.with_box_refine,
        two_stage=m.two_stage,
    )
