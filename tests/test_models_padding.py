"""Padding invariance: a padded image with its mask gives what the unpadded image gives.

Exact (to round-off) for the position encoding and the whole transformer (valid ratios, encoder reference points,
decoder references, two-stage proposals), whatever the padded features hold. The full detector is only close: the
original's backbone convolutions see the padding near the image border and GroupNorm in the input projections
normalises over the padded positions too, so its detections move slightly.
"""

from __future__ import annotations

import pytest
import torch
from _models_utils import VARIANTS, perturb, tiny_config

from deformable.modules import valid_ratio
from models import build_detector
from models.deformable_encoder import encoder_reference_points
from models.deformable_transformer import DeformableTransformer, encoder_proposals
from models.heads import make_heads
from models.position_encoding import PositionEmbeddingSine

pytestmark = pytest.mark.usefixtures("one_thread")

VALID = [(8, 12), (4, 6), (2, 3)]
PADDED = [(11, 13), (5, 9), (3, 3)]


def _pad(x: torch.Tensor, height: int, width: int) -> tuple[torch.Tensor, torch.Tensor]:
    """``(B, C, h, w)`` -> garbage-padded ``(B, C, height, width)`` and its mask."""
    b, c, h, w = x.shape
    padded = torch.randn(b, c, height, width) * 3
    padded[:, :, :h, :w] = x
    mask = torch.ones(b, height, width, dtype=torch.bool)
    mask[:, :h, :w] = False
    return padded, mask


def test_sine_position_encoding_ignores_padding():
    encoding = PositionEmbeddingSine(16)
    x = torch.randn(2, 4, 5, 7)
    padded, mask = _pad(x, 9, 10)
    plain = encoding(x, torch.zeros(2, 5, 7, dtype=torch.bool))
    torch.testing.assert_close(encoding(padded, mask)[:, :, :5, :7], plain)
    assert plain.shape == (2, 32, 5, 7)
    # normalised positions: (count - 0.5) / count * 2 pi at the last row, so sin of the first frequency is sin(~2pi)
    torch.testing.assert_close(plain[0, 0, -1, 0], torch.sin(torch.tensor((5 - 0.5) / (5 + 1e-6) * 2 * torch.pi)))


def test_valid_ratios_and_encoder_reference_points():
    mask = torch.zeros(1, 4, 8, dtype=torch.bool)
    mask[:, 3:, :] = True
    mask[:, :, 6:] = True
    ratios = valid_ratio(mask)
    torch.testing.assert_close(ratios, torch.tensor([[6 / 8, 3 / 4]]))
    points = encoder_reference_points([(4, 8)], ratios[:, None])  # (1, 32, 1, 2)
    # a pixel centre (i + 0.5) / valid extent, then scaled into the padded map: (i + 0.5) / full extent
    torch.testing.assert_close(points[0, 8 + 5, 0], torch.tensor([5.5 / 8, 1.5 / 4]))


def test_proposals_are_relative_to_the_valid_region():
    memory = torch.randn(1, 12, 4)
    mask = torch.zeros(1, 3, 4, dtype=torch.bool)
    mask[:, :, 2:] = True
    out_memory, proposals = encoder_proposals(memory, mask.flatten(1), [(3, 4)])
    assert torch.isinf(proposals.view(3, 4, 4)[:, 2:]).all() and not out_memory.view(3, 4, 4)[:, 2:].any()
    torch.testing.assert_close(proposals.sigmoid().view(3, 4, 4)[1, 1], torch.tensor([1.5 / 2, 1.5 / 3, 0.05, 0.05]))


@pytest.mark.parametrize(
    ("two_stage", "refine", "offsets"),
    [
        (False, False, "linear"),
        (False, True, "linear"),
        (True, True, "linear"),
        (True, False, "linear"),
        # CoPE reads the row and column through each reference point; an encoder point of a coarser level lies on
        # a line edge of the finer ones, where rounding alone (7 or 6.9999995 with padding) must not change the line.
        (False, False, "cope"),
        (False, True, "cope"),
        (True, True, "cope"),
    ],
)
def test_transformer_is_exactly_padding_invariant(two_stage, refine, offsets):
    torch.manual_seed(0)
    transformer = DeformableTransformer(
        d_model=64,
        nhead=8,
        num_encoder_layers=2,
        num_decoder_layers=3,
        dim_feedforward=128,
        dropout=0.0,
        num_feature_levels=3,
        two_stage=two_stage,
        two_stage_num_proposals=10,
        enc_offset_mode=offsets,
        dec_offset_mode=offsets,
    ).eval()
    class_embed, bbox_embed = make_heads(64, 5, 4 if two_stage else 3, shared=not refine, two_stage=two_stage)
    if refine:
        transformer.decoder.bbox_embed = bbox_embed
    for module in (transformer, class_embed, bbox_embed):
        perturb(module, 0.05)
    encoding = PositionEmbeddingSine(32)
    plain, padded = ([], [], []), ([], [], [])
    for (h, w), (height, width) in zip(VALID, PADDED, strict=True):
        src = torch.randn(1, 64, h, w)
        src_padded, mask = _pad(src, height, width)
        for lists, (s, m) in ((plain, (src, torch.zeros(1, h, w, dtype=torch.bool))), (padded, (src_padded, mask))):
            lists[0].append(s), lists[1].append(m), lists[2].append(encoding(s, m))
    query = None if two_stage else torch.randn(10, 128)
    heads = (class_embed[-1], bbox_embed[-1]) if two_stage else None
    with torch.no_grad():
        a = transformer(*plain, query, heads)
        b = transformer(*padded, query, heads)
    torch.testing.assert_close(a["hs"], b["hs"], atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(a["inter_references"], b["inter_references"], atol=1e-6, rtol=1e-6)
    torch.testing.assert_close(a["init_reference"], b["init_reference"], atol=1e-6, rtol=1e-6)


@pytest.mark.parametrize("variant", ["single_scale", "multi_scale", "box_refine"])
def test_detector_detections_barely_move_under_padding(variant):
    # Two-stage is left out: its top-k proposal selection may flip between near-equal scores, so queries differ.
    torch.manual_seed(0)
    model = build_detector(tiny_config(*VARIANTS[variant])).eval()
    perturb(model, 0.05)  # give the zero-initialised box heads something to say
    image = torch.randn(1, 3, 64, 128)
    padded = torch.zeros(1, 3, 128, 192)  # valid size and padding are multiples of the largest stride (64)
    padded[:, :, :64, :128] = image
    mask = torch.ones(1, 128, 192, dtype=torch.bool)
    mask[:, :64, :128] = False
    with torch.no_grad():
        a, b = model(image), model(padded, mask)
    assert a["pred_boxes"].std() > 0.01  # the check below is not vacuous
    torch.testing.assert_close(a["pred_boxes"], b["pred_boxes"], atol=0.05, rtol=0)  # padded-size boxes: x2/3, y/2
    torch.testing.assert_close(a["pred_logits"].sigmoid(), b["pred_logits"].sigmoid(), atol=0.02, rtol=0)
