"""``MSDeformAttn``: the original's parameters and initialisation, a forward computed by hand for point and box
references, the padding mask, input checks and autocast."""

from __future__ import annotations

import math

import pytest
import torch
from _ops_utils import level_tensors

from deformable import MSDeformAttn, ms_deform_attn
from deformable import modules as modules_module


def test_state_dict_keys_are_the_originals():
    module = MSDeformAttn(d_model=16, n_levels=3, n_heads=2, n_points=5)
    shapes = {k: tuple(v.shape) for k, v in module.state_dict().items()}
    assert shapes == {
        "sampling_offsets.weight": (2 * 3 * 5 * 2, 16),
        "sampling_offsets.bias": (2 * 3 * 5 * 2,),
        "attention_weights.weight": (2 * 3 * 5, 16),
        "attention_weights.bias": (2 * 3 * 5,),
        "value_proj.weight": (16, 16),
        "value_proj.bias": (16,),
        "output_proj.weight": (16, 16),
        "output_proj.bias": (16,),
    }


def test_d_model_not_divisible_by_heads():
    with pytest.raises(ValueError, match="d_model must be divisible by n_heads, but got 30 and 8"):
        MSDeformAttn(d_model=30, n_heads=8)


COPE = {"offset_mode": "cope"}


@pytest.mark.parametrize(
    ("args", "kwargs", "message"),
    [
        ((32, 1, 0, 2), {}, "n_heads must be >= 1, got 0"),
        ((32, 1, 4, 0), {}, "n_points must be >= 1, got 0"),
        ((32, 0, 4, 2), {}, "n_levels must be >= 1, got 0"),
        ((0, 1, 4, 2), {}, "d_model must be >= 1, got 0"),
        ((32, 1, -4, 2), {}, "n_heads must be >= 1, got -4"),
        ((32.0, 1, 4, 2), {}, r"d_model must be an integer, got 32\.0 \(float\)"),
        ((32, 1, 4, True), {}, r"n_points must be an integer, got True \(bool\)"),
        ((32, 1, 4.0, 2), {}, r"n_heads must be an integer, got 4\.0 \(float\)"),
        ((32, 1, 4, 2), {**COPE, "cope_channels": 0}, "cope_channels must be >= 1, got 0"),
        ((32, 1, 4, 2), {**COPE, "cope_channels": 2.0}, r"cope_channels must be an integer, got 2\.0 \(float\)"),
        ((32, 1, 4, 2), {**COPE, "cope_gate_dim": 0}, "cope_gate_dim must be >= 1, got 0"),
    ],
)
def test_bad_constructor_arguments(args, kwargs, message):
    with pytest.raises(ValueError, match=f"MSDeformAttn: {message}"):
        MSDeformAttn(*args, **kwargs)


def test_initialisation_is_the_originals_grid():
    module = MSDeformAttn()  # 256 channels, 4 levels, 8 heads, 4 points
    expected = []
    for m in range(8):  # head m looks along angle 2*pi*m/8, scaled so that max(|cos|, |sin|) = 1
        theta = 2 * math.pi * m / 8
        cos, sin = math.cos(theta), math.sin(theta)
        norm = max(abs(cos), abs(sin))
        expected += [[(i + 1) * cos / norm, (i + 1) * sin / norm] for _level in range(4) for i in range(4)]
    bias = module.sampling_offsets.bias.detach().view(8, 4, 4, 2)
    torch.testing.assert_close(bias, torch.tensor(expected).view(8, 4, 4, 2), rtol=1e-6, atol=1e-6)
    assert bias[2, 1, 3].tolist() == pytest.approx([0.0, 4.0], abs=1e-6)  # 90 degrees, 4th point
    assert bias[1, 0, 0].tolist() == pytest.approx([1.0, 1.0], abs=1e-6)  # 45 degrees: the corner of the square
    for name in ("sampling_offsets.weight", "attention_weights.weight", "attention_weights.bias"):
        assert not module.get_parameter(name).any(), name
    for proj in (module.value_proj, module.output_proj):
        assert not proj.bias.any()
        bound = math.sqrt(6 / (256 + 256))  # xavier_uniform
        assert proj.weight.abs().max() <= bound and proj.weight.std() > bound / 3


# Hand-computed case: d_model 4, 2 heads of D = 2 channels, one 2x3 level, 2 points, 2 queries; value and output
# projections are identities, so a sample is a bilinear mix of the input pixels. Pixel (r, c) holds p = 1 + 3r + c in
# the channels [p, p^2, -p, 2p] (head 0 reads the first two).
H, W = 2, 3
OFFSETS = [[(0.5, 0.0), (1.0, 1.0)], [(-1.0, 0.0), (0.25, 0.5)]]  # (head, point) -> (dx, dy)
ATTENTION = [[0.25, 0.75], [0.5, 0.5]]  # (head, point), from logits log(weight)
POINT_REFERENCES = [(0.5 / W, 0.5 / H), (0.5, 0.5)]  # centre of pixel (0, 0); the middle of the map
BOX_REFERENCES = [(0.5, 0.5, 2 / 3, 1.0), (0.25, 0.5, 1 / 3, 0.5)]  # (cx, cy, w, h)
# Corner weights {(row, col): weight} of every (query, head, point), worked out from the pixel coordinates
# x = loc_x * W - 0.5, y = loc_y * H - 0.5. Point references: loc = ref + offset / (W, H).
POINT_SAMPLES = [
    [  # query 0: the reference is pixel (x, y) = (0, 0)
        [{(0, 0): 0.5, (0, 1): 0.5}, {(1, 1): 1.0}],  # pixels (0.5, 0) and (1, 1)
        [{}, {(0, 0): 0.375, (0, 1): 0.125, (1, 0): 0.375, (1, 1): 0.125}],  # (-1, 0): outside; (0.25, 0.5)
    ],
    [  # query 1: the reference is pixel (1, 0.5)
        [{(0, 1): 0.25, (0, 2): 0.25, (1, 1): 0.25, (1, 2): 0.25}, {(1, 2): 0.5}],  # (1.5, 0.5); (2, 1.5): row 2 out
        [{(0, 0): 0.5, (1, 0): 0.5}, {(1, 1): 0.75, (1, 2): 0.25}],  # (0, 0.5); (1.25, 1)
    ],
]
# Box references: loc = centre + offset / n_points * (w, h) / 2.
BOX_SAMPLES = [
    [  # query 0: pixel = (1 + dx / 2, 0.5 + dy / 2)
        [{(0, 1): 0.375, (0, 2): 0.125, (1, 1): 0.375, (1, 2): 0.125}, {(1, 1): 0.5, (1, 2): 0.5}],
        [
            {(0, 0): 0.25, (0, 1): 0.25, (1, 0): 0.25, (1, 1): 0.25},
            {(0, 1): 0.21875, (0, 2): 0.03125, (1, 1): 0.65625, (1, 2): 0.09375},
        ],  # (1.125, 0.75)
    ],  # fmt: skip
    [  # query 1: pixel = (0.25 + dx / 4, 0.5 + dy / 4)
        [
            {(0, 0): 0.3125, (0, 1): 0.1875, (1, 0): 0.3125, (1, 1): 0.1875},  # (0.375, 0.5)
            {(0, 0): 0.125, (0, 1): 0.125, (1, 0): 0.375, (1, 1): 0.375},
        ],  # (0.5, 0.75)
        [
            {(0, 0): 0.5, (1, 0): 0.5},  # (0, 0.5): x = 0 exactly
            {(0, 0): 0.2578125, (0, 1): 0.1171875, (1, 0): 0.4296875, (1, 1): 0.1953125},
        ],  # (0.3125, 0.625)
    ],  # fmt: skip
]


def _hand_module() -> MSDeformAttn:
    module = MSDeformAttn(d_model=4, n_levels=1, n_heads=2, n_points=2).double()
    with torch.no_grad():
        for proj in (module.value_proj, module.output_proj):
            proj.weight.copy_(torch.eye(4))
        module.sampling_offsets.bias.copy_(torch.tensor(OFFSETS, dtype=torch.float64).flatten())
        module.attention_weights.bias.copy_(torch.tensor(ATTENTION, dtype=torch.float64).log().flatten())
    return module


def _pixels() -> torch.Tensor:
    p = torch.arange(1.0, H * W + 1, dtype=torch.float64)
    return torch.stack([p, p**2, -p, 2 * p], -1)  # (S, 4), row-major pixels


def _expected(samples) -> torch.Tensor:
    pixels = _pixels().view(H, W, 2, 2)  # (row, col, head, channel)
    out = torch.zeros(2, 2, 2, dtype=torch.float64)  # (query, head, channel)
    for q, per_query in enumerate(samples):
        for m, per_head in enumerate(per_query):
            for p, corners in enumerate(per_head):
                for (r, c), weight in corners.items():
                    out[q, m] += ATTENTION[m][p] * weight * pixels[r, c, m]
    return out.view(1, 2, 4)


@pytest.mark.parametrize("backend", ["native", "pytorch"])
@pytest.mark.parametrize(("references", "samples"), [(POINT_REFERENCES, POINT_SAMPLES), (BOX_REFERENCES, BOX_SAMPLES)])
def test_forward_computed_by_hand(references, samples, backend, monkeypatch):
    if backend == "pytorch":
        monkeypatch.setenv("DEFORMABLE_BACKEND", "pytorch")
    spatial_shapes, level_start_index = level_tensors([(H, W)])
    reference_points = torch.tensor(references, dtype=torch.float64).view(1, 2, 1, -1)  # (N, Lq, L, 2 or 4)
    query = torch.randn(1, 2, 4, dtype=torch.float64)  # offsets and weights come from the biases alone
    out = _hand_module()(query, reference_points, _pixels()[None], spatial_shapes, level_start_index)
    torch.testing.assert_close(out, _expected(samples), rtol=0, atol=1e-12)


def _random_case(seed: int = 0):
    torch.manual_seed(seed)
    module = MSDeformAttn(d_model=8, n_levels=2, n_heads=2, n_points=3)
    with torch.no_grad():
        for p in module.parameters():
            p.normal_(0, 0.3)
    spatial_shapes, level_start_index = level_tensors([(4, 5), (2, 3)])
    query, x = torch.randn(2, 6, 8), torch.randn(2, 26, 8)
    return module, query, torch.rand(2, 6, 2, 2), x, spatial_shapes, level_start_index


def test_padding_mask_zeroes_the_padded_values():
    module, query, reference_points, x, spatial_shapes, level_start_index = _random_case()
    mask = torch.rand(2, 26, generator=torch.Generator().manual_seed(3)) < 0.4
    out = module(query, reference_points, x, spatial_shapes, level_start_index, mask)
    # What padded positions hold does not matter, and is not zero: the value projection has a bias.
    garbage = x.masked_fill(mask[..., None], 1e3)
    torch.testing.assert_close(module(query, reference_points, garbage, spatial_shapes, level_start_index, mask), out)
    assert not torch.allclose(module(query, reference_points, x, spatial_shapes, level_start_index), out)
    # Everything padded: nothing is attended to, the output is the output projection's bias.
    everything = torch.ones_like(mask)
    out = module(query, reference_points, x, spatial_shapes, level_start_index, everything)
    torch.testing.assert_close(out, module.output_proj.bias.detach().expand_as(out))


@pytest.mark.parametrize(
    ("change", "message"),
    [
        ({"x": lambda t: t[:, :25]}, "input_spatial_shapes sum to 26 positions but input_flatten has 25"),
        ({"query": lambda t: t[..., :6]}, r"query must be \(N, Lq, 8\), got \(2, 6, 6\)"),
        ({"query": lambda t: t[0]}, r"query must be \(N, Lq, 8\), got \(6, 8\)"),
        ({"x": lambda t: t[:1]}, "query batch 2 != input_flatten batch 1"),
        ({"reference_points": lambda t: t[..., :1]}, r"reference_points must be \(N, Lq, L, 2\) points or"),
        ({"reference_points": lambda t: t[:, :, :1]}, r"with \(N, Lq, L\) = \(2, 6, 2\), got \(2, 6, 1, 2\)"),
        ({"spatial_shapes": lambda t: t[:1]}, r"input_spatial_shapes must be \(2, 2\), got \(1, 2\)"),
        ({"mask": lambda t: t[:, :20]}, r"input_padding_mask must be \(N, S\) = \(2, 26\), got \(2, 20\)"),
    ],
)
def test_bad_module_inputs(change, message):
    module, query, reference_points, x, spatial_shapes, level_start_index = _random_case()
    args = {"query": query, "reference_points": reference_points, "x": x, "spatial_shapes": spatial_shapes,
            "mask": torch.zeros(2, 26, dtype=torch.bool)}  # fmt: skip
    args.update({k: fn(args[k]) for k, fn in change.items()})
    query, reference_points, x, spatial_shapes, mask = args.values()
    with pytest.raises(ValueError, match=message):
        module(query, reference_points, x, spatial_shapes, level_start_index, mask)


@pytest.mark.parametrize(
    "mask",
    [torch.zeros(2, 26, dtype=torch.uint8), torch.zeros(2, 26), [[False] * 26] * 2],
    ids=["uint8", "float32", "list"],
)
def test_padding_mask_must_be_bool(mask):
    module, query, reference_points, x, spatial_shapes, level_start_index = _random_case()
    got = mask.dtype if isinstance(mask, torch.Tensor) else "list"
    message = (
        rf"input_padding_mask must be a torch.bool tensor of shape \(N, S\) = \(2, 26\), True at padding, got {got}"
    )
    with pytest.raises(TypeError, match=message):
        module(query, reference_points, x, spatial_shapes, level_start_index, mask)


def test_level_sequences_are_taken_like_tensors(backend):
    module, query, reference_points, x, spatial_shapes, level_start_index = _random_case()
    mask = torch.rand(2, 26, generator=torch.Generator().manual_seed(3)) < 0.4
    expected = module(query, reference_points, x, spatial_shapes, level_start_index, mask)
    for shapes, starts in (([[4, 5], [2, 3]], [0, 20]), (((4, 5), (2, 3)), level_start_index)):
        torch.testing.assert_close(module(query, reference_points, x, shapes, starts, mask), expected, rtol=0, atol=0)


@pytest.mark.parametrize(
    ("shapes", "error", "message"),
    [
        (20, TypeError, r"input_spatial_shapes must be an \(L, 2\) int64 tensor or a sequence of \(H, W\) int pairs"),
        ([[4, 5], [2]], ValueError, r"spatial_shapes must hold \(H, W\) pairs, one per level"),
        ([[4, 5], [2, 3], [1, 1]], ValueError, r"input_spatial_shapes must be \(2, 2\), got \(3, 2\)"),
    ],
)
def test_bad_level_sequences(shapes, error, message):
    module, query, reference_points, x, _, level_start_index = _random_case()
    with pytest.raises(error, match=message):
        module(query, reference_points, x, shapes, level_start_index)


def test_bfloat16_autocast(monkeypatch):
    # Observed on the CPU: value_proj runs in bfloat16, so value reaches the op in bfloat16; the locations are float32
    # (float32 reference points plus bfloat16 offsets promote); the op computes in float32 and returns bfloat16,
    # and output_proj keeps it bfloat16. Parameter gradients are float32.
    module, query, reference_points, x, spatial_shapes, level_start_index = _random_case()
    seen = {}

    def spy(value, spatial_shapes, level_start_index, locations, weights):
        seen.update(value=value.dtype, locations=locations.dtype)
        out = ms_deform_attn(value, spatial_shapes, level_start_index, locations, weights)
        seen["output"] = out.dtype
        return out

    monkeypatch.setattr(modules_module, "ms_deform_attn", spy)
    expected = module(query, reference_points, x, spatial_shapes, level_start_index)
    query.requires_grad_()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = module(query, reference_points, x, spatial_shapes, level_start_index)
    assert out.dtype == torch.bfloat16
    assert seen == {"value": torch.bfloat16, "locations": torch.float32, "output": torch.bfloat16}
    out.float().square().sum().backward()
    for name, p in module.named_parameters():
        assert p.grad.dtype == torch.float32 and p.grad.isfinite().all(), name
    assert query.grad.dtype == torch.float32 and query.grad.isfinite().all()
    torch.testing.assert_close(out.float(), expected, rtol=0, atol=5e-2 * expected.abs().max().item())
