"""tools/experiments/cope_counting.py's fixed probes (``--probe``): each differs from the default task only as stated,
its batches never target a marker off the map, and a few steps of training give a model with the right logits."""

from __future__ import annotations

import argparse
import dataclasses
import math

import numpy as np
import pytest
import torch
from _repo import load_tool

counting = load_tool("experiments/cope_counting")
pytestmark = pytest.mark.usefixtures("one_thread")

# What each held-out probe changes from the default probe, field by field.
PROBE_DIFFERENCES = {
    "points-2": {"points": 2},
    "heads-8-adamw": {"d_model": 64, "heads": 8, "optimizer": "adamw", "lr": 1e-3, "weight_decay": 0.05, "batch": 64},
    "two-levels-noisy": {
        "task.width": 96, "task.max_k": 4, "levels": 2, "noise": 0.3, "gaps": (3, 6), "ood_gaps": (7, 14),
    },
    "k-5-heads-4-points-3": {"task.max_k": 5, "heads": 4, "points": 3, "gaps": (2, 4), "ood_gaps": (5, 9)},
    "three-levels-sparse": {
        "task.width": 128, "d_model": 48, "levels": 3, "noise": 0.1, "gaps": (4, 8), "ood_gaps": (9, 16),
    },
    "small-slow": {"d_model": 16, "lr": 1e-3, "batch": 16, "gaps": (1, 4), "ood_gaps": (5, 10)},
    "classes-16-heads-4": {
        "task.width": 96, "task.classes": 16, "d_model": 64, "heads": 4, "gaps": (2, 6), "ood_gaps": (7, 14),
    },
    "adamw-slow": {"optimizer": "adamw", "lr": 5e-4, "weight_decay": 1e-4, "batch": 64},
    "far-ood-two-levels": {
        "task.max_k": 2, "points": 3, "levels": 2, "noise": 0.2, "gaps": (2, 3), "ood_gaps": (4, 16),
    },
}  # fmt: skip
PROBE_NAMES = list(PROBE_DIFFERENCES)


def differences(probe) -> dict:
    """The fields in which ``probe`` differs from the default probe (the task compared field by field)."""
    default = counting.PROBES["default"]
    out = {}
    for f in dataclasses.fields(probe):
        mine, theirs = getattr(probe, f.name), getattr(default, f.name)
        if f.name == "task":
            out.update({f"task.{k}": v for k, v in dataclasses.asdict(mine).items() if v != getattr(theirs, k)})
        elif mine != theirs:
            out[f.name] = mine
    return out


def test_the_default_probe_is_the_task_the_tables_measure() -> None:
    default = counting.PROBES["default"]
    assert default.task == counting.Task() == counting.Task(4, 64, 8, 3, (4, 12))
    assert (default.d_model, default.heads, default.points, default.levels, default.noise) == (32, 2, 4, 1, 0.0)
    assert (default.optimizer, default.lr, default.weight_decay, default.batch) == ("adam", 3e-3, 0.0, 32)
    assert (default.gaps, default.ood_gaps) == ((2, 5), (6, 12))


def test_probes_differ_from_the_default_as_stated() -> None:
    assert set(counting.PROBES) == {"default", *PROBE_NAMES}
    for name, expected in PROBE_DIFFERENCES.items():
        assert differences(counting.PROBES[name]) == expected, name


@pytest.mark.parametrize("name", ["default", *PROBE_NAMES])
def test_batches_never_target_a_marker_off_the_map(name: str) -> None:
    probe = counting.PROBES[name]
    task = probe.task
    h, w, k_max = task.height, task.width, task.max_k
    # Worst case: the last reference column with every gap at the largest OOD gap.
    assert task.ref_range[1] - 1 + k_max * probe.ood_gaps[1] <= w - 1
    generator = torch.Generator().manual_seed(0)
    for gaps in (probe.gaps, probe.ood_gaps, (probe.ood_gaps[1], probe.ood_gaps[1])):
        tokens, ks, ref, targets = counting.make_batch(task, 16, gaps, generator)
        assert tokens.shape == (16, h * w) and targets.shape == ks.shape == (16, h * k_max)
        assert ref.shape == (16, h * k_max, 1, 2)
        assert targets.min() >= 0 and targets.max() <= task.classes - 1
        image = tokens.view(16, h, w)
        ref_x = (ref[:, ::k_max, 0, 0] * w).floor().long()  # (B, H)
        for b in range(16):
            for row in range(h):
                assert image[b, row, ref_x[b, row]] == 0  # the query sits on background
                right = image[b, row, ref_x[b, row] + 1 :]
                markers = right[right > 0]
                assert len(markers) >= k_max  # the K-th marker is on the map...
                assert torch.equal(markers[:k_max] - 1, targets[b, row * k_max : (row + 1) * k_max])  # ...and named


def test_make_batch_refuses_gaps_that_push_the_kth_marker_off_the_map() -> None:
    task = counting.Task(width=96, max_k=4)
    counting.make_batch(task, 2, (14, 14), torch.Generator().manual_seed(0))
    with pytest.raises(ValueError, match="off a map of width 64"):
        counting.make_batch(counting.Task(max_k=4), 2, (7, 14), torch.Generator().manual_seed(0))


def probe_args(probe, steps: int) -> argparse.Namespace:
    fields = ("d_model", "heads", "points", "lr", "batch", "gaps", "levels", "noise", "optimizer", "weight_decay")
    args = argparse.Namespace(**{name: getattr(probe, name) for name in fields})
    args.steps, args.variant = steps, "default"
    return args


@pytest.mark.parametrize("name", PROBE_NAMES)
@pytest.mark.filterwarnings("ignore:MSDeformAttn. channels per head:UserWarning")  # three-levels-sparse: 48 / 2
def test_a_few_training_steps_per_probe_give_logits_per_query(name: str) -> None:
    probe = counting.PROBES[name]
    model = counting.train(probe.task, "linear", 0, probe_args(probe, steps=5))
    assert model.attn.n_heads == probe.heads and model.attn.n_points == probe.points
    assert model.attn.n_levels == probe.levels and model.attn.d_model == probe.d_model
    assert model.noise == probe.noise
    tokens, ks, ref, _ = counting.make_batch(probe.task, 3, probe.ood_gaps, torch.Generator().manual_seed(1))
    with torch.no_grad():
        logits = model(tokens, ks, ref, torch.Generator().manual_seed(2))
    assert logits.shape == (3, probe.task.height * probe.task.max_k, probe.task.classes)
    assert torch.isfinite(logits).all()


def test_train_takes_the_figure_scripts_arguments() -> None:
    """cope_figure.py passes a Namespace without the probe's levels, noise or optimiser: the default's apply."""
    args = argparse.Namespace(d_model=32, heads=2, points=4, lr=3e-3, steps=2, batch=4, gaps=(2, 5), variant="default")
    model = counting.train(counting.Task(), "linear", 0, args)
    assert model.attn.n_levels == 1 and model.noise == 0.0


def test_gate_warmup_holds_the_gates_at_their_start_for_its_share_of_the_steps() -> None:
    """``--gate-warmup``: the CoPE part keeps its initialisation (the module is the linear one) for that share of the
    steps, then trains; everything else trains throughout."""
    probe = counting.PROBES["default"]

    def trained(steps: int, warmup: float):
        args = probe_args(probe, steps)
        args.gate_warmup = warmup
        return counting.train(probe.task, "cope", 0, args)

    torch.manual_seed(0)
    fresh = counting.CountingModel(probe.task, "cope", probe.d_model, probe.heads, probe.points)
    held, released = trained(4, 1.0), trained(4, 0.5)
    for name, value in fresh.attn.cope.state_dict().items():
        assert torch.equal(held.attn.cope.state_dict()[name], value), name
    assert not torch.equal(released.attn.cope.gate_query, fresh.attn.cope.gate_query)
    assert not torch.equal(held.attn.sampling_offsets.weight, fresh.attn.sampling_offsets.weight)


def test_the_two_level_model_samples_both_levels_with_deterministic_noise() -> None:
    probe = counting.PROBES["two-levels-noisy"]
    task = probe.task
    model = counting.CountingModel(task, "linear", n_levels=2, noise=probe.noise)
    tokens, ks, ref, _ = counting.make_batch(task, 2, probe.gaps, torch.Generator().manual_seed(0))
    refs = model.reference_points(ref)
    assert refs.shape == (2, task.height * task.max_k, 2, 2)
    assert torch.equal(refs[:, :, 0], refs[:, :, 1])
    assert model.shapes.tolist() == [[task.height, task.width], [task.height, task.width // 2]]
    assert model.starts.tolist() == [0, task.height * task.width]

    seen = {}
    model.attn.register_forward_pre_hook(lambda _, inputs: seen.update(ref=inputs[1], values=inputs[2]))
    with torch.no_grad():
        a = model(tokens, ks, ref, torch.Generator().manual_seed(5))
        b = model(tokens, ks, ref, torch.Generator().manual_seed(5))
        c = model(tokens, ks, ref, torch.Generator().manual_seed(6))
    assert seen["ref"].shape[2] == 2
    assert seen["values"].shape == (2, task.height * task.width * 3 // 2, 32)
    assert torch.equal(a, b) and not torch.equal(a, c)
    # Level 1 is level 0 (the noisy embeddings) averaged over pairs of columns.
    level0 = seen["values"][:, : task.height * task.width].view(2, task.height, task.width, 32)
    level1 = seen["values"][:, task.height * task.width :].view(2, task.height, task.width // 2, 32)
    assert torch.allclose(level1, (level0[:, :, 0::2] + level0[:, :, 1::2]) / 2)
    clean = counting.CountingModel(task, "linear", n_levels=2)
    clean.load_state_dict(model.state_dict())
    noise = seen["values"][:, : task.height * task.width] - clean.values(tokens)[:, : task.height * task.width]
    assert 0.2 < noise.std().item() < 0.4


def test_each_further_level_pools_the_map_by_twice_as_many_columns() -> None:
    task = counting.PROBES["three-levels-sparse"].task
    model = counting.CountingModel(task, "linear", d_model=8, n_levels=3)
    h, w = task.height, task.width
    assert model.shapes.tolist() == [[h, w], [h, w // 2], [h, w // 4]]
    assert model.starts.tolist() == [0, h * w, h * w + h * w // 2]
    tokens, _, _, _ = counting.make_batch(task, 2, (4, 8), torch.Generator().manual_seed(0))
    with torch.no_grad():
        values = model.values(tokens)
    assert values.shape == (2, h * w * 7 // 4, 8)
    level0 = values[:, : h * w].view(2, h, w, 8)
    level2 = values[:, h * w + h * w // 2 :].view(2, h, w // 4, 8)
    assert torch.allclose(level2, level0.view(2, h, w // 4, 4, 8).mean(3), atol=1e-6)
    with pytest.raises(ValueError, match="must divide the width 62"):
        counting.CountingModel(counting.Task(width=62), "linear", n_levels=3)


def test_accuracy_per_k_scores_each_k_on_its_own() -> None:
    """A model that answers every query with the class of the first marker is right for k = 1 only."""
    task = counting.Task()

    class FirstMarker(counting.CountingModel):
        def forward(self, tokens, ks, ref, generator=None):
            x = (ref[:, :, 0, 0] * task.width).floor().long()  # (B, H*K)
            row = (ref[:, :, 0, 1] * task.height).floor().long()
            image = tokens.view(tokens.shape[0], task.height, task.width)
            out = torch.zeros(*ks.shape, task.classes)
            for b in range(tokens.shape[0]):
                for q in range(ks.shape[1]):
                    line = image[b, row[b, q], x[b, q] + 1 :]
                    out[b, q, line[line > 0][0] - 1] = 1.0
            return out

    model = FirstMarker(task, "linear", d_model=8)
    per_k = counting.accuracy_per_k(model, (2, 5), 256, seed=0)
    assert per_k.shape == (task.max_k,)
    assert per_k[0] == 1.0 and (per_k[1:] < 0.3).all()  # k > 1: right only when two markers share a class
    assert counting.accuracy(model, (2, 5), 256, seed=0) == pytest.approx(per_k.mean().item())


def seeded(variant: str) -> counting.CountingModel:
    """The default task's cope counting model of ``variant``, drawn from seed 0: variants built this way share the
    default's draws except where they say otherwise."""
    torch.manual_seed(0)
    return counting.CountingModel(counting.Task(), "cope", variant=variant)


def test_the_offset_and_gate_ablations_change_only_what_they_name() -> None:
    base = seeded("default")
    odd = seeded("odd-offsets")
    hard = seeded("hard-gates")
    # Head 0 samples along +x: its points start at 1, 2, 3, 4 counts, or 1, 3, 5, 7.
    start = base.attn.sampling_offsets.bias.view(2, 1, 4, 2)[0, 0, :, 0]
    assert start.tolist() == [1.0, 2.0, 3.0, 4.0]
    assert odd.attn.sampling_offsets.bias.view(2, 1, 4, 2)[0, 0, :, 0].tolist() == [1.0, 3.0, 5.0, 7.0]
    # odd-offsets: everything else is the default's draw. hard-gates: the CoPE part is the default's draw; the
    # rebuilt module has drawn from the generator, so the read-out after it is another draw.
    for other, expected in ((odd, {"attn.sampling_offsets.bias"}), (hard, {"readout.weight", "readout.bias"})):
        differs = {
            name for name, value in other.state_dict().items() if not torch.equal(value, base.state_dict()[name])
        }
        assert differs == expected
    logits = torch.tensor([-3.0, -2.0, 0.0, 1.0, 2.0, 5.0])
    assert hard.attn.cope.gate(logits).tolist() == [0.0, 0.0, 0.5, 0.75, 1.0, 1.0]
    assert hard.attn.cope.count_scale == base.attn.cope.count_scale == 2.0


def test_the_mixed_counts_ablation_inverts_the_mix_of_the_channels_counts() -> None:
    from deformable.cope_locate import cope_locate_lines

    generator = torch.Generator().manual_seed(0)
    density = torch.rand(6, 9, generator=generator, dtype=torch.float64) * 2
    density[:, 3] = 0.0  # a shut pixel on every line
    edges = torch.cat([density.new_zeros(6, 1), density.cumsum(-1)], -1)
    ref = torch.rand(10, generator=generator, dtype=torch.float64) * 11 - 1  # some outside [0, 9]
    offsets = torch.randn(10, 3, generator=generator, dtype=torch.float64) * 4
    one = torch.randint(0, 6, (10, 1), generator=generator)
    ones = torch.ones(10, 1, dtype=torch.float64)
    # One channel: the same as the module's inversion.
    torch.testing.assert_close(
        counting.mixed_count_locate(edges, one, ref, offsets, ones), cope_locate_lines(edges, one, ref, offsets, ones)
    )
    # Two channels: the mixed count at the landing point is the count at the reference plus the offset.
    lines = torch.randint(0, 6, (10, 2), generator=generator)
    mix = torch.softmax(torch.randn(10, 2, generator=generator, dtype=torch.float64), -1)
    x = counting.mixed_count_locate(edges, lines, ref, offsets, mix)
    mixed = (edges[lines] * mix[..., None]).sum(1)  # (10, 10)

    def count(b: int, at: torch.Tensor) -> torch.Tensor:
        inside = torch.from_numpy(np.interp(at.numpy(), np.arange(10), mixed[b].numpy()))
        return torch.where(at < 0, at, torch.where(at > 9, mixed[b, -1] + at - 9, inside))

    for b in range(10):
        torch.testing.assert_close(count(b, x[b]) - count(b, ref[b : b + 1]), offsets[b])


def test_the_capped_gate_counts_at_most_one_and_learns_from_its_start() -> None:
    base = seeded("default")
    capped = seeded("capped")
    torch.testing.assert_close(capped.attn.cope.gate_key.weight, base.attn.cope.gate_key.weight)  # the default's draw
    logits = torch.tensor([-40.0, -1.0, 0.0, 0.5, 3.0], requires_grad=True)
    gates = capped.attn.cope.gate(logits)
    density = gates * capped.attn.cope.count_scale
    expected = torch.cat([2 * torch.sigmoid(logits[:2]).detach(), torch.ones(3)])  # at most 1 count per pixel
    torch.testing.assert_close(density, expected)
    gates.sum().backward()
    # Every gate starts at logit 0: the gradient must reach it there (clamp's would be 0), and not above.
    assert logits.grad[2] == pytest.approx(0.25) and logits.grad[1] > 0
    assert logits.grad[3:].tolist() == [0.0, 0.0]


def test_the_rounded_gate_counts_whole_pixels_with_the_sigmoids_gradient() -> None:
    base = seeded("default")
    rounded = seeded("rounded")
    torch.testing.assert_close(rounded.attn.cope.gate_query, base.attn.cope.gate_query)  # the default's draw
    assert rounded.attn.cope.count_scale == 2.0  # round(2 * 1/2) = 1 count at the start, as the default
    logits = torch.tensor([-5.0, -1.2, 0.0, 1.0, 1.2, 5.0], dtype=torch.float64, requires_grad=True)
    density = rounded.attn.cope.gate(logits) * rounded.attn.cope.count_scale
    assert density.tolist() == [0.0, 0.0, 1.0, 1.0, 2.0, 2.0]  # sigmoid crosses 1/4 and 3/4 at logits -+1.0986
    density.sum().backward()
    sigmoid = torch.sigmoid(logits.detach())
    torch.testing.assert_close(logits.grad, 2 * sigmoid * (1 - sigmoid))


def test_the_jitter_ablation_moves_the_offsets_in_training_only() -> None:
    task = counting.Task()
    base = seeded("default")
    jitter = seeded("jitter")
    assert all(torch.equal(v, base.state_dict()[k]) for k, v in jitter.state_dict().items())  # same draws
    tokens, ks, ref, _ = counting.make_batch(task, 4, (2, 5), torch.Generator().manual_seed(0))
    base.eval()
    jitter.eval()
    torch.testing.assert_close(jitter(tokens, ks, ref), base(tokens, ks, ref), rtol=0, atol=0)
    jitter.train()
    torch.manual_seed(1)
    first = jitter(tokens, ks, ref)
    torch.manual_seed(2)
    assert not torch.allclose(jitter(tokens, ks, ref), first)
    torch.manual_seed(1)
    torch.testing.assert_close(jitter(tokens, ks, ref), first, rtol=0, atol=0)  # the global generator's draw


def test_the_cut_gate_starts_at_one_half_and_shuts_exactly_deep_in_the_tail() -> None:
    cut = seeded("cut").attn.cope
    shut = math.log(0.05 / 1.05)  # sigmoid = 0.05 / 1.1
    logits = torch.tensor([-10.0, shut - 1e-3, shut + 0.5, 0.0, 20.0])
    gates = cut.gate(logits)
    assert gates[:2].tolist() == [0.0, 0.0] and 0 < gates[2] < 0.05
    assert gates[3] == pytest.approx(0.5) and gates[4] == pytest.approx(1.05)
    assert cut.count_scale == 2.0  # a fresh module still counts 1 per pixel: the plain one


def test_the_capped_cut_gate_is_the_cut_one_below_zero_and_the_capped_one_above() -> None:
    both = seeded("capped-cut").attn.cope
    cut = seeded("cut").attn.cope
    below, above = torch.linspace(-8, 0, 17), torch.linspace(0.1, 8, 9)
    torch.testing.assert_close(both.gate(below), cut.gate(below))
    assert (both.gate(above) == 0.5).all()  # a pixel counts at most 1


def test_the_binarise_penalty_is_the_gates_mean_spread_and_still_at_the_start() -> None:
    model = seeded("binarise-0.1")
    task = model.task
    tokens, ks, ref, _ = counting.make_batch(task, 4, (2, 5), torch.Generator().manual_seed(0))
    model(tokens, ks, ref)
    penalty = model.attn.cope.penalty
    assert penalty.item() == pytest.approx(0.25)  # every gate starts at 1/2: g (1 - g) = 1/4
    penalty.backward()
    assert model.attn.cope.gate_bias.grad.abs().max() < 1e-12  # 1/2 is where the penalty's slope is 0
    with torch.no_grad():
        model.attn.cope.gate_bias.fill_(-2.0)
    model(tokens, ks, ref)
    gate = torch.sigmoid(torch.tensor(-2.0))
    assert model.attn.cope.penalty.item() == pytest.approx((gate * (1 - gate)).item(), rel=1e-5)


def test_the_late_binarise_penalty_waits_for_half_the_steps_then_rises_to_its_weight() -> None:
    weights = [counting.penalty_weight("binarise-late-1", step, 101) for step in range(101)]
    assert weights[:51] == [0.0] * 51 and weights[75] == pytest.approx(0.5) and weights[100] == pytest.approx(1.0)
    assert all(a <= b for a, b in zip(weights, weights[1:], strict=False))
    assert {counting.penalty_weight("binarise-0.1", step, 101) for step in (0, 50, 100)} == {0.1}
