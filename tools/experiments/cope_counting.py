"""Counting benchmark for ``MSDeformAttn(offset_mode=...)``: read the k-th marker to the right of a point.

Each image is H rows of W pixels; a row holds 1-pixel markers of random class separated by random gaps, and the
query of that row sits on a background pixel with markers on both sides. A query names k (1..K) and must predict
the class of the k-th marker to its right. A sampling offset in pixels cannot do this, since where the k-th marker
lies depends on the gaps; an offset in contextual counts (``offset_mode="cope"``) can, with gates open on markers
and closed on background: one fixed offset per k, whatever the gaps. The model is one MSDeformAttn layer (one
level, 2 heads x 4 points) plus a linear read-out; it trains on gaps drawn from ``--gaps`` and is evaluated on
those and on wider, unseen gaps (``--ood-gaps``). ``--variant`` trains the ablations of the cope parametrisation.

    python tools/experiments/cope_counting.py --seeds 0 1 2 --steps 1500
"""

from __future__ import annotations

import argparse
import time
import warnings
from dataclasses import dataclass

import torch
from torch import nn
from torch.nn import functional as F

from deformable import MSDeformAttn
from deformable.cope_sampling import CoPESampling

# Ablations of the cope parametrisation (all start at the plain module's sampling locations).
VARIANTS = {
    "default": {},
    "temperature-1": {"gate_temperature": 1.0},  # gate logits q.k/sqrt(G), as in the paper's code
    "open-init": {"gate_bias_init": 3.0},  # gates start open (0.95)
    "closed-init": {"gate_bias_init": -3.0},  # gates start closed (0.05)
    "floor": {},  # density (1 - a) + a * density, a = sigmoid(learned), a = 0.5 at start: a residual mix
}


class FloorSampling(CoPESampling):
    """The "floor" ablation: a learned per head/level/axis mix of pixel units and contextual units."""

    def __init__(self, *args, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.mix_logit = nn.Parameter(torch.zeros(self.n_heads, self.n_levels, 2))

    def _density(self, queries, keys, valid, index, n_lines, lvl, axis):
        mix = torch.sigmoid(self.mix_logit[:, lvl, axis, None]).to(queries.dtype)
        return (1 - mix) + mix * super()._density(queries, keys, valid, index, n_lines, lvl, axis)


@dataclass
class Task:
    height: int = 4
    width: int = 64
    classes: int = 8
    max_k: int = 3
    ref_range: tuple[int, int] = (4, 12)  # reference x in [a, b)


def make_batch(task: Task, batch: int, gaps: tuple[int, int], generator: torch.Generator):
    """Images ``(B, H, W)`` of tokens (0 background, 1..C marker class), queries and targets.

    Returns:
        tokens ``(B, H*W)``, ks ``(B, H*K)`` in 1..K, reference points ``(B, H*K, 1, 2)``, targets ``(B, H*K)``.
    """
    h, w, k_max = task.height, task.width, task.max_k
    rows = batch * h
    ref_x = torch.randint(task.ref_range[0], task.ref_range[1], (rows,), generator=generator)
    n_gaps = w // gaps[0] + 1
    steps = torch.randint(gaps[0], gaps[1] + 1, (rows, 2, n_gaps), generator=generator)
    right = ref_x[:, None] + steps[:, 0].cumsum(-1)  # marker x to the right, the k-th at column k-1
    left = ref_x[:, None] - steps[:, 1].cumsum(-1)
    classes = torch.randint(1, task.classes + 1, (rows, 2, n_gaps), generator=generator)
    tokens = torch.zeros(rows, w + 1, dtype=torch.long)  # column w collects the markers off the map
    tokens.scatter_(1, right.clamp(max=w), classes[:, 0])
    tokens.scatter_(1, left.clamp(min=0).where(left >= 0, torch.full_like(left, w)), classes[:, 1])
    tokens = tokens[:, :w].reshape(batch, h * w)
    targets = classes[:, 0, :k_max].reshape(batch, h * k_max) - 1
    ks = torch.arange(1, k_max + 1).repeat(batch, h)
    ref = torch.stack([(ref_x + 0.5) / w, (torch.arange(h).repeat(batch) + 0.5) / h], -1)  # (B*H, 2)
    ref = ref.view(batch, h, 1, 2).expand(-1, -1, k_max, -1).reshape(batch, h * k_max, 1, 2)
    return tokens, ks, ref, targets


class CountingModel(nn.Module):
    """Token embedding -> one MSDeformAttn (query = embedding of k) -> linear read-out of the marker class."""

    def __init__(
        self,
        task: Task,
        offset_mode: str,
        d_model: int = 32,
        n_heads: int = 2,
        n_points: int = 4,
        variant: str = "default",
    ):
        super().__init__()
        self.task = task
        self.tokens = nn.Embedding(task.classes + 1, d_model)
        self.queries = nn.Embedding(task.max_k + 1, d_model)
        self.attn = MSDeformAttn(d_model, 1, n_heads, n_points, offset_mode=offset_mode)
        if offset_mode == "cope" and variant != "default":
            sampling = FloorSampling if variant == "floor" else CoPESampling
            self.attn.cope = sampling(d_model, 1, n_heads, n_points, **VARIANTS[variant])
        self.readout = nn.Linear(d_model, task.classes)
        self.register_buffer("shapes", torch.tensor([[task.height, task.width]]))
        self.register_buffer("starts", torch.tensor([0]))

    def forward(self, tokens: torch.Tensor, ks: torch.Tensor, ref: torch.Tensor) -> torch.Tensor:
        out = self.attn(self.queries(ks), ref, self.tokens(tokens), self.shapes, self.starts)
        return self.readout(out)  # (B, Lq, classes)


@torch.no_grad()
def accuracy(model: CountingModel, gaps: tuple[int, int], samples: int, seed: int) -> float:
    generator = torch.Generator().manual_seed(seed)
    correct = total = 0
    for _ in range(max(1, samples // 256)):
        tokens, ks, ref, targets = make_batch(model.task, 256, gaps, generator)
        correct += (model(tokens, ks, ref).argmax(-1) == targets).sum().item()
        total += targets.numel()
    return correct / total


def train(task: Task, offset_mode: str, seed: int, args: argparse.Namespace) -> CountingModel:
    torch.manual_seed(seed)
    model = CountingModel(task, offset_mode, args.d_model, args.heads, args.points, args.variant)
    optimizer = torch.optim.Adam(model.parameters(), lr=args.lr)
    schedule = torch.optim.lr_scheduler.OneCycleLR(optimizer, args.lr, total_steps=args.steps, pct_start=0.1)
    generator = torch.Generator().manual_seed(1000 + seed)
    for _ in range(args.steps):
        tokens, ks, ref, targets = make_batch(task, args.batch, args.gaps, generator)
        loss = F.cross_entropy(model(tokens, ks, ref).flatten(0, 1), targets.flatten())
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        schedule.step()
    return model


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--steps", type=int, default=1500)
    parser.add_argument("--modes", nargs="+", default=["linear", "cope"])
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--lr", type=float, default=3e-3)
    parser.add_argument("--d-model", type=int, default=32)
    parser.add_argument("--heads", type=int, default=2)
    parser.add_argument("--points", type=int, default=4)
    parser.add_argument("--variant", choices=list(VARIANTS), default="default", help="cope ablation")
    parser.add_argument("--gaps", type=int, nargs=2, default=[2, 5], help="training gaps between markers, inclusive")
    parser.add_argument("--ood-gaps", type=int, nargs=2, default=[6, 12])
    parser.add_argument("--eval-samples", type=int, default=2048)
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args()
    args.gaps, args.ood_gaps = tuple(args.gaps), tuple(args.ood_gaps)
    torch.set_num_threads(args.threads)
    warnings.filterwarnings("ignore", message="deformable: the native extension")
    task = Task()

    print(
        f"gaps {args.gaps} (train), {args.ood_gaps} (OOD); {args.steps} steps, batch {args.batch}, lr {args.lr}, "
        f"{args.heads} heads x {args.points} points, cope variant {args.variant}"
    )
    print("| mode | seed | in-dist acc | OOD acc | train s |")
    print("|---|---|---|---|---|")
    results: dict[str, list[tuple[float, float]]] = {mode: [] for mode in args.modes}
    for mode in args.modes:
        for seed in args.seeds:
            start = time.perf_counter()
            model = train(task, mode, seed, args)
            seconds = time.perf_counter() - start
            ind = accuracy(model, args.gaps, args.eval_samples, seed=99)
            ood = accuracy(model, args.ood_gaps, args.eval_samples, seed=99)
            results[mode].append((ind, ood))
            print(f"| {mode} | {seed} | {ind:.3f} | {ood:.3f} | {seconds:.0f} |", flush=True)
    print()
    print("| mode | mean in-dist acc | mean OOD acc |")
    print("|---|---|---|")
    for mode, rows in results.items():
        ind = sum(r[0] for r in rows) / len(rows)
        ood = sum(r[1] for r in rows) / len(rows)
        print(f"| {mode} | {ind:.3f} | {ood:.3f} |")


if __name__ == "__main__":
    main()
