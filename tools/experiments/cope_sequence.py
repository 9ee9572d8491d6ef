"""The CoPE paper's counting task at CPU scale: a small causal transformer with CoPE versus learned relative PE.

Programs over 1 or 3 variables of ``x = 0 ;`` / ``pass;`` / ``x ++;`` statements (the official tokens), values
capped at 10, 3 to ``--max-statements`` statements, then ``print x``; the model predicts x's value at the last
token. As in the paper: a fixed training set (10k programs), post-norm transformer, no absolute positions, the loss
on the answer only, the error on 1000 fresh programs. Scaled down to train in minutes on one CPU thread: 2 layers,
64 hidden, 4 heads, up to 32 statements, 3000 steps of 32. Short programs drawn with the paper's weights
(set / pass / inc 1 / 50 / 7) hardly reset or increment anything (1.2 resets, 1.7 increments per 32-statement
program), so the default weights are 1 / 3 / 3: 3 resets and 6 increments per program (the paper's 512-statement
programs: 5.5 and 25), in 35 tokens instead of 325.

    python tools/experiments/cope_sequence.py --vars 1 3 --pos rel cope --seeds 0
    python tools/experiments/cope_sequence.py --weights 1 50 7 --max-statements 32   # the paper's weights
"""

from __future__ import annotations

import argparse
import math
import random
import time

import torch
from torch import nn
from torch.nn import functional as F

from deformable.cope import CoPE

MAX_VALUE = 10
OP_WEIGHTS = {"set": 1, "pass": 50, "inc": 7}
VOCAB = ["<pad>", "=", "0", ";", "pass;", "++;", "print"] + list("abcdefghij")  # the official tokens
TOKEN = {t: i for i, t in enumerate(VOCAB)}


def make_program(
    n_vars: int, max_statements: int, rng: random.Random, weights: dict[str, float] = OP_WEIGHTS
) -> tuple[list[int], int]:
    """One program as token ids ending in ``print x``, and x's value."""
    while True:
        names, values, tokens = list("abcdefghij")[:n_vars], {}, []
        for _ in range(rng.randint(3, max_statements)):
            for _ in range(100):  # redraw statements that cannot apply yet
                op = rng.choices(list(weights), list(weights.values()))[0]
                if op == "set":
                    var = rng.choice(names)
                    values[var] = 0
                    tokens += [var, "=", "0", ";"]
                elif op == "pass":
                    tokens += ["pass;"]
                elif values and values[var := rng.choice(list(values))] < MAX_VALUE:
                    values[var] += 1
                    tokens += [var, "++;"]
                else:
                    continue
                break
        if values:
            var = rng.choice(list(values))
            return [TOKEN[t] for t in tokens + ["print", var]], values[var]


def make_set(
    n: int, n_vars: int, max_statements: int, seed: int, weights: dict[str, float] = OP_WEIGHTS
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``(n, T)`` right-padded token ids, ``(n,)`` lengths and ``(n,)`` answers."""
    rng = random.Random(seed)
    programs = [make_program(n_vars, max_statements, rng, weights) for _ in range(n)]
    length = max(len(p) for p, _ in programs)
    tokens = torch.zeros(n, length, dtype=torch.long)
    for i, (p, _) in enumerate(programs):
        tokens[i, : len(p)] = torch.tensor(p)
    lengths = torch.tensor([len(p) for p, _ in programs])
    return tokens, lengths, torch.tensor([a for _, a in programs])


class Attention(nn.Module):
    """Causal multi-head attention with CoPE (``pos="cope"``) or learned relative positions (``pos="rel"``)."""

    def __init__(self, dim: int, heads: int, pos: str, max_len: int) -> None:
        super().__init__()
        self.heads, self.head_dim, self.pos = heads, dim // heads, pos
        self.qkv = nn.Linear(dim, 3 * dim)
        self.out = nn.Linear(dim, dim)
        if pos == "cope":
            self.cope = CoPE(max_len + 1, self.head_dim)
        else:  # the paper's relative PE: q_i . r[i - j], r learned
            self.rel = nn.Parameter(torch.randn(self.head_dim, max_len) * self.head_dim**-0.5)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, t, _ = x.shape
        q, k, v = self.qkv(x).view(b, t, 3, self.heads, self.head_dim).permute(2, 0, 3, 1, 4).flatten(1, 2)
        causal = torch.ones(t, t, dtype=torch.bool, device=x.device).tril()
        logits = q @ k.transpose(1, 2)  # (B*heads, T, T)
        if self.pos == "cope":
            logits = logits + self.cope(q, logits, causal[None])
        else:
            distance = (torch.arange(t)[:, None] - torch.arange(t)[None]).clamp(0, self.rel.shape[1] - 1)
            logits = logits + (q @ self.rel).gather(-1, distance.expand(q.shape[0], -1, -1))
        attn = (logits / math.sqrt(self.head_dim)).masked_fill(~causal, float("-inf")).softmax(-1)
        return self.out((attn @ v).view(b, self.heads, t, self.head_dim).transpose(1, 2).reshape(b, t, -1))


class Block(nn.Module):
    def __init__(self, dim: int, heads: int, pos: str, max_len: int) -> None:
        super().__init__()
        self.attn = Attention(dim, heads, pos, max_len)
        self.ff = nn.Sequential(nn.Linear(dim, 4 * dim), nn.ReLU(), nn.Linear(4 * dim, dim))
        self.norm1, self.norm2 = nn.LayerNorm(dim), nn.LayerNorm(dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.norm1(x + self.attn(x))
        return self.norm2(x + self.ff(x))


class Counter(nn.Module):
    """Token embedding -> post-norm causal blocks -> the answer (0..10) read at the last token."""

    def __init__(self, pos: str, max_len: int, dim: int = 64, heads: int = 4, layers: int = 2) -> None:
        super().__init__()
        self.embed = nn.Embedding(len(VOCAB), dim)
        self.blocks = nn.ModuleList(Block(dim, heads, pos, max_len) for _ in range(layers))
        self.head = nn.Linear(dim, MAX_VALUE + 1)

    def forward(self, tokens: torch.Tensor, lengths: torch.Tensor) -> torch.Tensor:
        x = self.embed(tokens)
        for block in self.blocks:
            x = block(x)
        return self.head(x[torch.arange(len(tokens)), lengths - 1])


@torch.no_grad()
def error_rate(model: Counter, data: tuple[torch.Tensor, ...], batch: int = 250) -> float:
    model.eval()
    wrong = 0
    for i in range(0, len(data[0]), batch):
        tokens, lengths, answers = (d[i : i + batch] for d in data)
        tokens = tokens[:, : int(lengths.max())]
        wrong += (model(tokens, lengths).argmax(-1) != answers).sum().item()
    model.train()
    return wrong / len(data[0])


def run(n_vars: int, pos: str, seed: int, args: argparse.Namespace) -> tuple[float, float, float]:
    """Trains one model; returns (train error, test error, seconds)."""
    weights = dict(zip(OP_WEIGHTS, args.weights, strict=True))
    train = make_set(args.train_size, n_vars, args.max_statements, 10_000 + seed, weights)
    test = make_set(args.test_size, n_vars, args.max_statements, 20_000 + seed, weights)
    max_len = max(train[0].shape[1], test[0].shape[1])
    torch.manual_seed(seed)
    model = Counter(pos, max_len, args.dim, args.heads, args.layers)
    optimizer = torch.optim.AdamW(model.parameters(), lr=args.lr, weight_decay=0.0)
    schedule = torch.optim.lr_scheduler.OneCycleLR(optimizer, args.lr, total_steps=args.steps, pct_start=0.05)
    generator = torch.Generator().manual_seed(seed)
    start = time.perf_counter()
    for _ in range(args.steps):
        index = torch.randint(0, args.train_size, (args.batch,), generator=generator)
        tokens, lengths, answers = (d[index] for d in train)
        logits = model(tokens[:, : int(lengths.max())], lengths)
        loss = F.cross_entropy(logits, answers)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        schedule.step()
    seconds = time.perf_counter() - start
    return error_rate(model, train), error_rate(model, test), seconds


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--vars", type=int, nargs="+", default=[1, 3])
    parser.add_argument("--pos", nargs="+", default=["rel", "cope"], choices=["rel", "cope"])
    parser.add_argument("--seeds", type=int, nargs="+", default=[0])
    parser.add_argument("--steps", type=int, default=3000)
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--lr", type=float, default=2e-3)
    parser.add_argument("--dim", type=int, default=64)
    parser.add_argument("--heads", type=int, default=4)
    parser.add_argument("--layers", type=int, default=2)
    parser.add_argument("--max-statements", type=int, default=32)
    parser.add_argument(
        "--weights", type=float, nargs=3, default=[1, 3, 3], help="set / pass / inc weights (the paper: 1 50 7)"
    )
    parser.add_argument("--train-size", type=int, default=10_000)
    parser.add_argument("--test-size", type=int, default=1000)
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)

    print(
        f"{args.layers} layers, {args.dim} hidden, {args.heads} heads; up to {args.max_statements} statements; "
        f"statement weights set/pass/inc {args.weights}; {args.train_size} training programs, {args.steps} steps of "
        f"{args.batch}, lr {args.lr}"
    )
    print("| variables | position | seed | train error % | test error % | train s |")
    print("|---|---|---|---|---|---|")
    for n_vars in args.vars:
        for pos in args.pos:
            for seed in args.seeds:
                train_err, test_err, seconds = run(n_vars, pos, seed, args)
                print(f"| {n_vars} | {pos} | {seed} | {100 * train_err:.1f} | {100 * test_err:.1f} | {seconds:.0f} |")


if __name__ == "__main__":
    main()
