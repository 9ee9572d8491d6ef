"""The convergence ablation of issue 19: each training-only option alone and together, on several data sets, same
epochs for every row of a data set, several seeds; one JSON line per run, a markdown table at the end.

    python tools/experiments/convergence_ablation.py --out runs/ablation \\
        --data demo=configs/shapes.yaml:3 \\
        --data raccoon=configs/custom.yaml:6:../shared/data/raccoon \\
        --data clutter=configs/custom.yaml:6:data/clutter \\
        --seeds 1 2
    python tools/experiments/convergence_ablation.py --out runs/ablation --table      # the table of what is done

``--data NAME=CONFIG:EPOCHS[:ROOT]``: a data set, the config it trains with, the epoch budget (the learning rate
drops after three quarters of it, evaluation once at the end) and ``data.root`` (omitted: the config's). Each run
is ``tools/train.py CONFIG`` in a subprocess with ``train.seed``, the epochs and the option's overrides; its AP and
AP50 are the last evaluation in its ``log.jsonl``, its minutes the wall time of the subprocess (data loading,
training and the final evaluation). Runs already in ``OUT/results.jsonl`` are skipped, so a killed ablation resumes
where it stopped: the run it was in continues from its last checkpoint (``train.resume=auto``; training is
deterministic for a seed, so AP is the same, and its minutes are those of the resumed part). Options
(``--options``, default the five of issue 19; ``denoising_groups`` is the pair without the IoU-aware loss): see
OPTIONS; ``enc_cope`` / ``dec_cope`` / ``cope`` compare CoPE offsets with the linear ones (``recipe``: the config as
written, its denoising default included; ``none`` turns every training option off).
``--set KEY=VALUE ...`` adds overrides to every run (e.g. ``data.hflip=false`` where a flip would change the labels).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time

# Each training option set explicitly, so that a row means the same whatever the config turns on by default
# (configs/custom.yaml and configs/shapes.yaml ship with denoising on).
_TRAINING_OPTIONS = {  # name: (off, on)
    "dn": ("training_queries.dn_groups=0", "training_queries.dn_groups=5"),
    "groups": ("training_queries.query_groups=1", "training_queries.query_groups=3"),
    "iou": ("loss.iou_aware=false", "loss.iou_aware=true"),
}


def _with(*on: str) -> list[str]:
    """Overrides turning the ``on`` training options on and every other one off."""
    return [values[name in on] for name, values in _TRAINING_OPTIONS.items()]


OPTIONS = {
    "none": _with(),
    "denoising": _with("dn"),
    "groups": _with("groups"),
    "iou_aware": _with("iou"),
    "all": _with("dn", "groups", "iou"),
    "denoising_groups": _with("dn", "groups"),  # the two that raised AP on the shapes and ordinal sets
    # The config as written (its own training options), and CoPE offsets (issue 17) on top of it, compared with
    # "recipe" (linear offsets): not part of the default set.
    "recipe": [],
    "enc_cope": ["model.enc_offset_mode=cope"],
    "dec_cope": ["model.dec_offset_mode=cope"],
    "cope": ["model.enc_offset_mode=cope", "model.dec_offset_mode=cope"],
}
DEFAULT_OPTIONS = ["none", "denoising", "groups", "iou_aware", "all"]
TRAIN = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "train.py")


def parse_data(spec: str) -> tuple[str, str, int, str | None]:
    """``NAME=CONFIG:EPOCHS[:ROOT]`` -> (name, config, epochs, root or None)."""
    name, _, rest = spec.partition("=")
    parts = rest.split(":", 2)
    if not name or len(parts) < 2 or not parts[1].isdigit():
        raise ValueError(f"--data {spec!r}: expected NAME=CONFIG:EPOCHS[:ROOT]")
    return name, parts[0], int(parts[1]), parts[2] if len(parts) == 3 else None


def last_evaluation(log_path: str) -> dict:
    with open(log_path, encoding="utf-8") as f:
        records = [json.loads(line) for line in f if line.strip()]
    evaluated = [r for r in records if "AP" in r]
    if not evaluated:
        raise RuntimeError(f"{log_path} has no evaluation")
    return evaluated[-1]


def run_one(
    out: str, data: tuple[str, str, int, str | None], option: str, seed: int, extra: tuple[str, ...] = ()
) -> dict:
    name, config, epochs, root = data
    run_dir = os.path.join(out, f"{name}_{option}_s{seed}")
    overrides = [f"output_dir={run_dir}", f"train.seed={seed}", f"train.epochs={epochs}"]
    overrides += [f"train.lr_drop={max(1, round(0.75 * epochs))}", f"train.eval_every={epochs}"]
    overrides += ["train.checkpoint_every=0", "train.resume=auto", *extra, *OPTIONS[option]]
    if root is not None:
        overrides.append(f"data.root={root}")
    command = [sys.executable, TRAIN, config, *overrides]
    print(f"[{time.strftime('%H:%M:%S')}] {name} {option} seed {seed}: {' '.join(command[1:])}", flush=True)
    start = time.perf_counter()
    with open(os.path.join(out, f"{name}_{option}_s{seed}.txt"), "w", encoding="utf-8") as log:
        code = subprocess.run(command, stdout=log, stderr=subprocess.STDOUT).returncode
    minutes = (time.perf_counter() - start) / 60
    if code != 0:
        raise RuntimeError(f"{name} {option} seed {seed} failed (exit {code}); see its .txt beside the results")
    final = last_evaluation(os.path.join(run_dir, "log.jsonl"))
    return {"data": name, "option": option, "seed": seed, "epochs": epochs, "AP": final["AP"],
            "AP50": final["AP50"], "minutes": round(minutes, 2)}  # fmt: skip


def table(results: list[dict]) -> str:
    lines = ["| data | option | epochs | AP per seed | AP50 per seed | mean AP | mean AP50 | minutes per seed |"]
    lines.append("|---|---|---|---|---|---|---|---|")
    keys = sorted({(r["data"], r["option"]) for r in results}, key=lambda k: (k[0], list(OPTIONS).index(k[1])))
    for data, option in keys:
        rows = sorted((r for r in results if (r["data"], r["option"]) == (data, option)), key=lambda r: r["seed"])
        ap = " / ".join(f"{r['AP']:.3f}" for r in rows)
        ap50 = " / ".join(f"{r['AP50']:.3f}" for r in rows)
        minutes = " / ".join(f"{r['minutes']:.1f}" for r in rows)
        mean_ap = sum(r["AP"] for r in rows) / len(rows)
        mean_ap50 = sum(r["AP50"] for r in rows) / len(rows)
        means = f"{mean_ap:.3f} | {mean_ap50:.3f}"
        lines.append(f"| {data} | {option} | {rows[0]['epochs']} | {ap} | {ap50} | {means} | {minutes} |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", required=True, help="folder for the runs and results.jsonl")
    parser.add_argument("--data", action="append", default=[], help="NAME=CONFIG:EPOCHS[:ROOT] (repeatable)")
    parser.add_argument("--options", nargs="+", default=DEFAULT_OPTIONS, choices=list(OPTIONS))
    parser.add_argument("--set", nargs="+", default=[], metavar="KEY=VALUE", help="overrides for every run")
    parser.add_argument("--seeds", type=int, nargs="+", default=[1, 2])
    parser.add_argument("--table", action="store_true", help="print the table of results.jsonl and stop")
    args = parser.parse_args(argv)
    os.makedirs(args.out, exist_ok=True)
    results_path = os.path.join(args.out, "results.jsonl")
    results = []
    if os.path.exists(results_path):
        with open(results_path, encoding="utf-8") as f:
            results = [json.loads(line) for line in f if line.strip()]
    if not args.table:
        try:
            datasets = [parse_data(spec) for spec in args.data]
        except ValueError as exc:
            print(f"error: {exc}", file=sys.stderr)
            return 2
        done = {(r["data"], r["option"], r["seed"]) for r in results}
        for seed in args.seeds:  # every data set and option on one seed before the next seed
            for data in datasets:
                for option in args.options:
                    if (data[0], option, seed) in done:
                        continue
                    result = run_one(args.out, data, option, seed, tuple(args.set))
                    print(json.dumps(result), flush=True)
                    results.append(result)
                    with open(results_path, "a", encoding="utf-8") as f:
                        f.write(json.dumps(result) + "\n")
    print(table(results))
    return 0


if __name__ == "__main__":
    sys.exit(main())
