"""Detection heads: the class head (a Linear with the focal-loss prior) and the 3-layer box MLP."""

from __future__ import annotations

import copy
import math

import torch
from torch import nn
from torch.nn import functional as F

PRIOR_PROB = 0.01  # initial foreground probability of every class logit


class MLP(nn.Module):
    """``num_layers`` Linear layers with ReLU between them (state_dict keys ``layers.{i}.*``)."""

    def __init__(self, input_dim: int, hidden_dim: int, output_dim: int, num_layers: int) -> None:
        super().__init__()
        dims_in = [input_dim] + [hidden_dim] * (num_layers - 1)
        dims_out = [hidden_dim] * (num_layers - 1) + [output_dim]
        self.layers = nn.ModuleList(nn.Linear(i, o) for i, o in zip(dims_in, dims_out, strict=True))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """``(..., input_dim)`` -> ``(..., output_dim)``."""
        for i, layer in enumerate(self.layers):
            x = layer(x) if i == len(self.layers) - 1 else F.relu(layer(x))
        return x


def reset_class_head(head: nn.Linear) -> None:
    """Default Linear init, bias at ``-log((1 - p) / p)`` so every class starts at probability ``PRIOR_PROB``."""
    head.reset_parameters()
    with torch.no_grad():
        head.bias.fill_(-math.log((1 - PRIOR_PROB) / PRIOR_PROB))


def make_heads(
    hidden_dim: int, num_classes: int, num_pred: int, shared: bool, two_stage: bool
) -> tuple[nn.ModuleList, nn.ModuleList]:
    """The per-prediction class and box heads, initialised as the original does.

    Args:
        hidden_dim: decoder width.
        num_classes: class logits per query.
        num_pred: heads needed (decoder layers, plus one for the two-stage encoder proposals).
        shared: one head pair used by every prediction (no box refinement); the lists still hold ``num_pred``
            entries, all the same module, so the state_dict lists ``class_embed.0..num_pred-1`` like the original.
        two_stage: box heads start with zero bias everywhere (proposals already carry a size).

    Returns:
        ``(class_embed, bbox_embed)``: ModuleLists of ``Linear(hidden_dim, num_classes)`` and
        ``MLP(hidden_dim, hidden_dim, 4, 3)``. The box MLP's last layer starts at zero; its size bias (indices 2:)
        starts at -2 for the first head only (or the shared one), so layer 0 turns 2-d reference points into
        boxes of sigmoid(-2) ~ 0.12 and later layers start by keeping their input box.
    """
    class_head = nn.Linear(hidden_dim, num_classes)
    reset_class_head(class_head)
    box_head = MLP(hidden_dim, hidden_dim, 4, 3)
    nn.init.constant_(box_head.layers[-1].weight, 0.0)
    nn.init.constant_(box_head.layers[-1].bias, 0.0)
    if shared:
        class_embed = nn.ModuleList([class_head] * num_pred)
        bbox_embed = nn.ModuleList([box_head] * num_pred)
    else:
        class_embed = nn.ModuleList(copy.deepcopy(class_head) for _ in range(num_pred))
        bbox_embed = nn.ModuleList(copy.deepcopy(box_head) for _ in range(num_pred))
    if not two_stage:
        nn.init.constant_(bbox_embed[0].layers[-1].bias[2:], -2.0)
    return class_embed, bbox_embed
