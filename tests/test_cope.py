"""The 1-D CoPE block against a direct, slow implementation of the paper's formulas."""

from __future__ import annotations

import math

import pytest
import torch

from deformable.cope import CoPE, cope_positions, interpolate_position_logits


def cope_direct(query: torch.Tensor, keys: torch.Tensor, pos_emb: torch.Tensor, npos_max: int) -> torch.Tensor:
    """Loops over (b, i, j): g_it = sigmoid(q_i.k_t / sqrt(d)), p_ij = sum_{t=j..i} g_it (causal), clipped,
    e[p] = (p - floor p) e[ceil p] + (1 - p + floor p) e[floor p], logit q_i . e[p_ij]; 0 for j > i."""
    b_size, t_len, d = query.shape
    out = torch.zeros(b_size, t_len, t_len, dtype=query.dtype)
    for b in range(b_size):
        for i in range(t_len):
            for j in range(i + 1):
                p = sum(torch.sigmoid(query[b, i] @ keys[b, t] / math.sqrt(d)) for t in range(j, i + 1))
                p = min(float(p), npos_max - 1)
                lo, hi = math.floor(p), math.ceil(p)
                emb = (p - lo) * pos_emb[:, hi] + (1 - p + lo) * pos_emb[:, lo]
                out[b, i, j] = query[b, i] @ emb
    return out


@pytest.mark.parametrize("npos_max", [3, 16])
def test_matches_the_direct_formula(npos_max: int) -> None:
    gen = torch.Generator().manual_seed(0)
    query = torch.randn(2, 6, 4, generator=gen, dtype=torch.float64)
    keys = torch.randn(2, 6, 4, generator=gen, dtype=torch.float64)
    cope = CoPE(npos_max, 4).double()
    with torch.no_grad():
        cope.pos_emb.normal_(generator=gen)
    causal = torch.ones(6, 6, dtype=torch.bool).tril()
    got = cope(query, query @ keys.transpose(1, 2), causal[None])
    expected = cope_direct(query, keys, cope.pos_emb.detach(), npos_max)
    torch.testing.assert_close(got * causal, expected, rtol=1e-10, atol=1e-10)


def test_all_gates_open_gives_relative_positions() -> None:
    causal = torch.ones(5, 5, dtype=torch.bool).tril()
    positions = cope_positions(torch.full((1, 5, 5), 50.0, dtype=torch.float64), causal)
    i, j = torch.meshgrid(torch.arange(5), torch.arange(5), indexing="ij")
    torch.testing.assert_close(positions[0], ((i - j + 1) * causal).double())


def test_interpolation_at_integers_and_between() -> None:
    logits = torch.tensor([[0.0, 10.0, 20.0, 40.0]], dtype=torch.float64)
    positions = torch.tensor([[0.0, 1.0, 1.25, 2.5, 3.0]], dtype=torch.float64)
    torch.testing.assert_close(
        interpolate_position_logits(logits, positions), torch.tensor([[0.0, 10.0, 12.5, 30.0, 40.0]]).double()
    )


def test_fresh_block_is_plain_attention() -> None:
    query = torch.randn(3, 5, 8)
    assert torch.equal(CoPE(8, 8)(query, torch.randn(3, 5, 5)), torch.zeros(3, 5, 5))


def test_gradcheck_reaches_gates_and_embedding() -> None:
    gen = torch.Generator().manual_seed(1)
    pos_emb = torch.randn(3, 5, generator=gen, dtype=torch.float64, requires_grad=True)
    query = torch.randn(1, 4, 3, generator=gen, dtype=torch.float64, requires_grad=True)
    keys = torch.randn(1, 4, 3, generator=gen, dtype=torch.float64, requires_grad=True)
    causal = torch.ones(4, 4, dtype=torch.bool).tril()[None]
    cope = CoPE(5, 3).double()

    def fn(q, k, emb):
        return torch.func.functional_call(cope, {"pos_emb": emb}, (q, q @ k.transpose(1, 2), causal))

    assert torch.autograd.gradcheck(fn, (query, keys, pos_emb))


@pytest.mark.parametrize(
    ("make", "message"),
    [
        (lambda: CoPE(0, 4), "npos_max must be >= 1"),
        (lambda: CoPE(4, 0), "head_dim must be >= 1"),
        (lambda: CoPE(4, 4)(torch.randn(1, 3, 5), torch.randn(1, 3, 3)), "query must end in head_dim = 4"),
        (lambda: CoPE(4, 4)(torch.randn(1, 3, 4), torch.randn(1, 2, 3)), "attn_logits"),
    ],
)
def test_bad_arguments(make, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        make()
