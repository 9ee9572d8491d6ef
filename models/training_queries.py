"""Training-only queries: denoising queries (DN-DETR) and extra one-to-many query groups (Group DETR).

Both are extra decoder queries appended after the detector's Q matching queries while training. Their parameters
(a label embedding and a box-to-query MLP for denoising, the groups' query embeddings) live in :class:`QueryAids`,
outside :class:`~models.detector.DeformableDETR`, so the detector's state_dict is the original's and a checkpoint
trained with them is a plain detector. A self-attention mask keeps every kind of query to itself: the matching
queries never see an extra query, so at inference (no extra queries) they compute what they were trained to.

- Denoising (Li et al., DN-DETR, CVPR 2022): ``dn_groups`` noised copies of each image's ground truth; each query
  starts from its (possibly flipped) label's embedding at its (shifted, rescaled) box and is trained to
  reconstruct the true label and box, with no matching. Groups are padded to the batch's largest target count.
- Query groups (Chen et al., Group DETR, ICCV 2023): ``query_groups - 1`` more sets of Q learned queries, each
  matched one-to-one to the targets on its own, which gives every target several positive queries per image.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from .box_ops import inverse_sigmoid
from .config import Config, ConfigError
from .deformable_transformer import proposal_pos_embed
from .heads import MLP
from .training_noise import noise_boxes, noise_labels

__all__ = ["ExtraLayout", "ExtraQueries", "QueryAids", "TrainingDetector", "build_query_aids", "extra_attention_mask"]


@dataclass(frozen=True)
class ExtraLayout:
    """Where each kind of extra query sits, after the Q matching queries (indices count extra slots from 0).

    First ``dn_groups`` denoising groups of ``dn_slots`` slots (slot j of every group reconstructs target j of its
    image; slots at or beyond an image's target count are padding), then ``query_groups`` one-to-many groups of
    ``group_size`` queries.
    """

    dn_groups: int
    dn_slots: int
    query_groups: int
    group_size: int

    @property
    def num_dn(self) -> int:
        return self.dn_groups * self.dn_slots

    @property
    def num_extra(self) -> int:
        return self.num_dn + self.query_groups * self.group_size

    def group_slice(self, group: int) -> slice:
        """The extra slots of one-to-many group ``group`` (0-based among the extra groups)."""
        start = self.num_dn + group * self.group_size
        return slice(start, start + self.group_size)

    def dn_valid(self, counts: list[int], device: torch.device | None = None) -> torch.Tensor:
        """``(B, num_dn)`` bool: True at the denoising slots that hold a target (``counts``: targets per image)."""
        slot = torch.arange(self.dn_slots, device=device).repeat(self.dn_groups)  # (num_dn,)
        return slot[None, :] < torch.as_tensor(counts, device=device)[:, None]

    def dn_indices(self, counts: list[int]) -> list[tuple[torch.Tensor, torch.Tensor]]:
        """Per image ``(slot_index, target_index)`` of its denoising queries, int64, in the matcher's format."""
        pairs = []
        for n in counts:
            target = torch.arange(n, dtype=torch.int64).repeat(self.dn_groups)
            group = torch.arange(self.dn_groups, dtype=torch.int64).repeat_interleave(n)
            pairs.append((group * self.dn_slots + target, target))
        return pairs


@dataclass
class ExtraQueries:
    """Extra decoder queries for one batch, appended after the matching queries.

    Attributes:
        tgt: ``(B, E, C)`` query content.
        query_pos: ``(B, E, C)`` query position embedding.
        reference_points: ``(B, E, 2)`` centres, or ``(B, E, 4)`` boxes ``(cx, cy, w, h)`` in two-stage: the same
            dimension as the detector's matching queries, in [0, 1] relative to the valid image region.
        attn_mask: ``(Q + E, Q + E)`` bool, True where query i may NOT attend to query j.
        padding: ``(B, E)`` bool, True at padded denoising slots (hidden from every other query).
        layout: which slot is which.
    """

    tgt: torch.Tensor
    query_pos: torch.Tensor
    reference_points: torch.Tensor
    attn_mask: torch.Tensor
    padding: torch.Tensor
    layout: ExtraLayout

    def self_attn_mask(self, num_heads: int) -> torch.Tensor:
        """The ``attn_mask`` of ``nn.MultiheadAttention`` over all Q + E queries: ``(Q + E, Q + E)`` when no slot is
        padding, else ``(B * num_heads, Q + E, Q + E)`` with each image's padded slots hidden from every query but
        themselves (a query that may attend to nothing would give NaN)."""
        if not bool(self.padding.any()):
            return self.attn_mask
        n = self.attn_mask.shape[0]
        num_matching = n - self.padding.shape[1]
        pad = torch.cat([self.padding.new_zeros(self.padding.shape[0], num_matching), self.padding], 1)  # (B, N)
        eye = torch.eye(n, dtype=torch.bool, device=pad.device)
        mask = self.attn_mask[None] | (pad[:, None, :] & ~eye)  # (B, N, N)
        return mask.repeat_interleave(num_heads, dim=0)


def extra_attention_mask(num_queries: int, layout: ExtraLayout, device: torch.device | None = None) -> torch.Tensor:
    """``(Q + E, Q + E)`` bool, True = may not attend: every query attends only within its own block, the blocks
    being the Q matching queries, each denoising group and each one-to-many group."""
    n = num_queries + layout.num_extra
    allowed = torch.zeros(n, n, dtype=torch.bool, device=device)
    blocks = [(0, num_queries)]
    blocks += [(num_queries + i * layout.dn_slots, layout.dn_slots) for i in range(layout.dn_groups)]
    blocks += [(num_queries + layout.group_slice(g).start, layout.group_size) for g in range(layout.query_groups)]
    for start, size in blocks:
        allowed[start : start + size, start : start + size] = True
    return ~allowed


class QueryAids(nn.Module):
    """The training-only parameters that make the extra queries, and :meth:`make`, which makes them for a batch.

    Args:
        hidden_dim: the detector's width C.
        num_classes: the detector's class count K.
        num_queries: the detector's matching queries Q (the size of every one-to-many group).
        dn_groups: denoising groups (0: no denoising).
        dn_label_noise: probability of replacing a denoising query's label by another class.
        dn_box_noise: box noise scale: the centre moves by up to this times half the width/height, width and
            height are scaled by a factor in ``[1 - scale, 1 + scale]``.
        query_groups: query groups in all, the detector's own included (1: no extra groups).
        two_stage: the detector is two-stage (4-d reference boxes; no extra groups).

    Parameters (only those of the enabled options): ``label_embed`` ``(K, C)``, ``box_pos`` (a 2-layer MLP from the
    sine embedding of a box, ``4 * C/2`` features, to C), ``group_embed`` ``((query_groups - 1) * Q, 2C)`` split
    into ``(query_pos, tgt)`` like the detector's ``query_embed``, and ``group_reference_points`` ``Linear(C, 2)``.
    """

    def __init__(
        self,
        *,
        hidden_dim: int,
        num_classes: int,
        num_queries: int,
        dn_groups: int = 0,
        dn_label_noise: float = 0.2,
        dn_box_noise: float = 0.4,
        query_groups: int = 1,
        two_stage: bool = False,
    ) -> None:
        super().__init__()
        check_query_options(dn_groups, dn_label_noise, dn_box_noise, query_groups, two_stage)
        self.hidden_dim, self.num_classes, self.num_queries = hidden_dim, num_classes, num_queries
        self.dn_groups, self.dn_label_noise, self.dn_box_noise = dn_groups, dn_label_noise, dn_box_noise
        self.query_groups, self.two_stage = query_groups, two_stage
        if dn_groups > 0:
            self.label_embed = nn.Embedding(num_classes, hidden_dim)
            self.box_pos = MLP(2 * hidden_dim, hidden_dim, hidden_dim, 2)
        if query_groups > 1:
            self.group_embed = nn.Embedding((query_groups - 1) * num_queries, 2 * hidden_dim)
            self.group_reference_points = nn.Linear(hidden_dim, 2)  # as the detector's: xavier, zero bias
            nn.init.xavier_uniform_(self.group_reference_points.weight, gain=1.0)
            nn.init.constant_(self.group_reference_points.bias, 0.0)

    def make(self, targets: list[dict], generator: torch.Generator | None = None) -> ExtraQueries:
        """The extra queries of a batch.

        Args:
            targets: one dict per image with ``labels (n,)`` int64 and ``boxes (n, 4)`` normalised cxcywh, on the
                aids' device.
            generator: the random numbers of the noise (default: torch's global generator).

        Returns:
            :class:`ExtraQueries` with E = ``dn_groups * max(n) + (query_groups - 1) * Q`` queries.
        """
        device = next(self.parameters()).device
        counts = [len(t["labels"]) for t in targets]
        dn_slots = max(counts, default=0) if self.dn_groups > 0 else 0
        layout = ExtraLayout(self.dn_groups, dn_slots, self.query_groups - 1, self.num_queries)
        parts = []
        if layout.num_dn > 0:
            parts.append(self._denoising(targets, dn_slots, generator))
        if layout.query_groups > 0:
            parts.append(self._groups(len(targets)))
        if not parts:  # denoising only, and no image has a target
            empty = torch.zeros(len(targets), 0, self.hidden_dim, device=device)
            parts.append((empty, empty, empty.new_zeros(len(targets), 0, 4 if self.two_stage else 2)))
        tgt, query_pos, reference_points = (torch.cat(p, 1) for p in zip(*parts, strict=True))
        padding = torch.zeros(len(targets), layout.num_extra, dtype=torch.bool, device=device)
        padding[:, : layout.num_dn] = ~layout.dn_valid(counts, device)
        return ExtraQueries(
            tgt, query_pos, reference_points, extra_attention_mask(self.num_queries, layout, device), padding, layout
        )

    def _denoising(
        self, targets: list[dict], slots: int, generator: torch.Generator | None
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """``(tgt, query_pos, reference_points)`` of the denoising queries: ``(B, G * slots, C)`` twice and
        ``(B, G * slots, 2 or 4)``; padded slots hold label 0 at a centred box (hidden by the mask, no loss)."""
        b, g = len(targets), self.dn_groups
        device = self.label_embed.weight.device
        labels = torch.zeros(b, slots, dtype=torch.int64, device=device)
        boxes = torch.tensor([0.5, 0.5, 0.25, 0.25], device=device).repeat(b, slots, 1)
        for i, t in enumerate(targets):
            labels[i, : len(t["labels"])] = t["labels"]
            boxes[i, : len(t["labels"])] = t["boxes"].to(boxes)
        labels = noise_labels(labels[:, None].expand(b, g, slots), self.num_classes, self.dn_label_noise, generator)
        boxes = noise_boxes(boxes[:, None].expand(b, g, slots, 4), self.dn_box_noise, generator)
        labels, boxes = labels.reshape(b, g * slots), boxes.reshape(b, g * slots, 4)
        tgt = self.label_embed(labels)
        query_pos = self.box_pos(proposal_pos_embed(inverse_sigmoid(boxes), self.hidden_dim // 2))
        return tgt, query_pos, boxes if self.two_stage else boxes[..., :2]

    def _groups(self, batch_size: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """``(tgt, query_pos, reference_points)`` of the one-to-many groups: ``(B, (G - 1) * Q, C)`` twice and
        ``(B, (G - 1) * Q, 2)``, the same for every image, as the detector's learned queries are."""
        query_pos, tgt = torch.split(self.group_embed.weight, self.hidden_dim, dim=1)
        reference_points = self.group_reference_points(query_pos).sigmoid()
        return tuple(x.unsqueeze(0).expand(batch_size, -1, -1) for x in (tgt, query_pos, reference_points))


def check_query_options(
    dn_groups: int, label_noise: float, box_noise: float, query_groups: int, two_stage: bool
) -> None:
    """Refuses ``training_queries`` values out of range or that contradict ``model.two_stage`` (ConfigError naming
    the option); training checks them before it writes anything."""
    if dn_groups < 0:
        raise ConfigError(f"training_queries.dn_groups must be >= 0, got {dn_groups}")
    if not 0.0 <= label_noise <= 1.0:
        raise ConfigError(f"training_queries.dn_label_noise must be in [0, 1], got {label_noise}")
    if not 0.0 <= box_noise <= 1.0:
        raise ConfigError(f"training_queries.dn_box_noise must be in [0, 1], got {box_noise}")
    if query_groups < 1:
        raise ConfigError(f"training_queries.query_groups must be >= 1 (1: no extra groups), got {query_groups}")
    if two_stage and query_groups > 1:
        raise ConfigError(
            f"training_queries.query_groups={query_groups} needs learned queries, but model.two_stage=true takes "
            "them from the encoder's proposals: set training_queries.query_groups=1 (denoising, "
            "training_queries.dn_groups, works with two-stage) or model.two_stage=false"
        )


class TrainingDetector(nn.Module):
    """What training runs (and DDP wraps): the detector and, when a training-query option is on, its aids.

    ``forward(images, mask, targets)`` makes the batch's extra queries and runs the detector with them; the
    checkpoint keeps ``detector.state_dict()`` as its ``model`` and ``aids.state_dict()`` apart.
    """

    def __init__(self, detector: nn.Module, aids: QueryAids | None = None) -> None:
        super().__init__()
        self.detector = detector
        self.aids = aids

    def forward(self, images: torch.Tensor, mask: torch.Tensor | None, targets: list[dict]) -> dict:
        """The detector's outputs (see ``DeformableDETR.forward``), with ``extra_outputs`` and ``extra_layout``
        when there are aids."""
        if self.aids is None:
            return self.detector(images, mask)
        return self.detector(images, mask, extra=self.aids.make(targets))


def build_query_aids(cfg: Config) -> QueryAids | None:
    """``cfg.training_queries`` (dn_groups, dn_label_noise, dn_box_noise, query_groups) and ``cfg.model``
    (hidden_dim, num_classes, num_queries, two_stage); None when denoising and query groups are both off."""
    q, m = cfg.training_queries, cfg.model
    if q.dn_groups == 0 and q.query_groups == 1:
        return None
    if not isinstance(m.num_classes, int):
        raise ValueError(f"model.num_classes must be resolved to an integer first, got {m.num_classes!r}")
    return QueryAids(
        hidden_dim=m.hidden_dim,
        num_classes=m.num_classes,
        num_queries=m.num_queries,
        dn_groups=q.dn_groups,
        dn_label_noise=q.dn_label_noise,
        dn_box_noise=q.dn_box_noise,
        query_groups=q.query_groups,
        two_stage=m.two_stage,
    )
