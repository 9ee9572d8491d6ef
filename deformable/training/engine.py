"""The training loop: :func:`train_one_epoch`, :func:`evaluate` and :func:`fit` (setup, resume, epochs, checkpoints).

Single process or one process per device under ``torchrun``; only rank 0 writes files or shows progress.
"""

from __future__ import annotations

import contextlib
import math
import os
import time
from collections.abc import Iterable
from typing import Any

import torch
from pycocotools.coco import COCO
from torch import nn
from torch.nn.parallel import DistributedDataParallel
from torch.optim.swa_utils import AveragedModel
from torch.utils.data import DataLoader
from tqdm import tqdm

from deformable.data import in_dataset_ids, resolve_num_classes, set_epoch
from deformable.data.coco_eval import coco_scores, to_coco_results
from models import build_criterion, build_postprocessor, load_detector, read_checkpoint
from models.checkpoint import Checkpoint, copy_checkpoint, save_checkpoint
from models.config import Config, config_to_dict
from models.files import make_dir
from models.loading import check_architecture
from models.training_queries import TrainingDetector

from . import distributed
from .build import (
    Data,
    build_data,
    build_model,
    build_trainee,
    check_data_location,
    check_options,
    check_start,
    finetune_from,
    prepare_data,
    prepare_output_dir,
    read_start,
    resolve_data_options,
    save_resolved_config,
)
from .distributed import DistEnv
from .ema import build_ema
from .optim import build_lr_scheduler, build_optimizer
from .resume import (
    BEST_METRIC,
    best_checkpoint,
    check_resumable,
    evaluates_after,
    keep_best,
    latest_checkpoint,
    log_unlogged_epoch,
    restore_training_state,
    rng_state,
    stalled,
    start_log,
    training_state,
)
from .run_log import LOG_NAME, append_log, best_logged, epoch_record, format_metrics, write_json
from .start import nothing_to_resume, refuse_overwrite, resume_path
from .stops import diverged, stopped_early

AMP_DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16}


def autocast(amp: str, device: torch.device) -> contextlib.AbstractContextManager:
    """``torch.autocast`` for ``train.amp`` (none | bf16 | fp16) on ``device``'s type."""
    if amp == "none":
        return contextlib.nullcontext()
    if amp not in AMP_DTYPES:
        raise ValueError(f"train.amp must be none, bf16 or fp16, got {amp!r}")
    return torch.autocast(device.type, dtype=AMP_DTYPES[amp])


def to_float(tree: Any) -> Any:
    """Casts every floating tensor in nested dicts/lists to float32 (the loss and post-processing run in fp32)."""
    if isinstance(tree, torch.Tensor):
        return tree.float() if tree.is_floating_point() else tree
    if isinstance(tree, dict):
        return {k: to_float(v) for k, v in tree.items()}
    if isinstance(tree, (list, tuple)):
        return type(tree)(to_float(v) for v in tree)
    return tree


def to_device(targets: Iterable[dict[str, Any]], device: torch.device) -> list[dict[str, Any]]:
    return [{k: v.to(device, non_blocking=True) for k, v in t.items()} for t in targets]


def train_one_epoch(
    model: nn.Module,
    criterion: nn.Module,
    loader: DataLoader,
    optimizer: torch.optim.Optimizer,
    *,
    device: torch.device,
    epoch: int,
    clip_max_norm: float = 0.1,
    amp: str = "none",
    scaler: torch.amp.GradScaler | None = None,
    max_iters: int = 0,
    show_progress: bool = True,
    ema: AveragedModel | None = None,
) -> dict[str, float]:
    """One pass over ``loader`` (at most ``max_iters`` batches when > 0); returns the mean of every loss term
    (``loss`` is the weighted sum) and ``grad_norm``, averaged over processes. ``ema``, the detector's weight
    average (:mod:`.ema`), takes in every optimiser step.

    Batches are ``(images (B, 3, H, W), mask (B, H, W) True = padding, targets)``; ``criterion(outputs, targets)``
    returns weighted loss terms and ``loss``. ``model`` is a detector, or a ``TrainingDetector`` (its training-only
    queries are made from the targets), possibly in DDP.

    Raises:
        FloatingPointError: the predictions (:class:`~models.matcher.HungarianMatcher`), the loss or, without a
            gradient scaler, the gradient norm is NaN or inf; the message starts "at epoch E step S: ".
    """
    model.train()
    criterion.train()
    total = len(loader) if max_iters <= 0 else min(max_iters, len(loader))
    sums: dict[str, float] = {}
    norms = 0  # steps with a finite gradient norm
    # closed on an error too, before the tool prints it: the message gets a line of its own
    with tqdm(total=total, desc=f"epoch {epoch}", disable=not show_progress, dynamic_ncols=True, leave=True) as bar:
        for step, (images, mask, targets) in enumerate(loader):
            if step >= total:
                break
            images, mask = images.to(device, non_blocking=True), mask.to(device, non_blocking=True)
            targets = to_device(targets, device)
            with autocast(amp, device):
                outputs = _forward(model, images, mask, targets)
            try:
                losses = criterion(to_float(outputs), targets)
                _check_loss(losses)
                optimizer.zero_grad(set_to_none=True)
                grad_norm = _backward_step(losses["loss"], model, optimizer, scaler, clip_max_norm)
            except FloatingPointError as exc:
                raise FloatingPointError(f"at epoch {epoch} step {step}: {exc}") from exc
            if ema is not None:
                ema.update_parameters(_detector(model))
            for key, value in _items(losses).items():
                sums[key] = sums.get(key, 0.0) + value
            if math.isfinite(grad_norm):  # fp16: a step the scaler skipped (overflow) has no gradient to measure
                sums["grad_norm"], norms = sums.get("grad_norm", 0.0) + grad_norm, norms + 1
            bar.set_postfix(loss=f"{sums['loss'] / (step + 1):.4f}", lr=f"{optimizer.param_groups[0]['lr']:.2e}")
            bar.update()
    means = {key: value / max(total, 1) for key, value in sums.items()}
    means["grad_norm"] = sums.get("grad_norm", math.nan) / max(norms, 1)  # over the steps taken
    return distributed.reduce_mean(means, device)


def _forward(model: nn.Module, images: torch.Tensor, mask: torch.Tensor, targets: list[dict]) -> dict:
    """A ``TrainingDetector`` (DDP-wrapped or not) takes the targets, a bare detector does not."""
    if isinstance(_unwrap(model), TrainingDetector):
        return model(images, mask, targets)
    return model(images, mask)


def _unwrap(model: nn.Module) -> nn.Module:
    """The module inside a DDP wrapper (``model`` itself when not wrapped)."""
    return model.module if isinstance(model, DistributedDataParallel) else model


def _detector(model: nn.Module) -> nn.Module:
    """The detector inside a ``TrainingDetector`` and/or DDP wrapper."""
    inner = _unwrap(model)
    return inner.detector if isinstance(inner, TrainingDetector) else inner


def _items(losses: dict[str, torch.Tensor]) -> dict[str, float]:
    return {key: float(value.detach()) for key, value in losses.items()}


def _check_loss(losses: dict[str, torch.Tensor]) -> None:
    """Raises FloatingPointError naming the terms that are NaN or inf when the weighted sum ``loss`` is."""
    if not math.isfinite(losses["loss"].item()):
        bad = [f"{key} {value}" for key, value in _items(losses).items() if key != "loss" and not math.isfinite(value)]
        raise FloatingPointError(f"the loss is {losses['loss'].item()} ({', '.join(bad)})")


def _backward_step(
    loss: torch.Tensor,
    model: nn.Module,
    optimizer: torch.optim.Optimizer,
    scaler: torch.amp.GradScaler | None,
    clip_max_norm: float,
) -> float:
    """Backward, optional unscale + gradient clipping, optimiser step; returns the gradient norm before clipping.
    Raises FloatingPointError, before the step, when the norm is NaN or inf without a scaler (one skips that step)."""
    params = [p for p in model.parameters() if p.requires_grad]
    if scaler is not None:
        scaler.scale(loss).backward()
        scaler.unscale_(optimizer)
    else:
        loss.backward()
    max_norm = clip_max_norm if clip_max_norm > 0 else float("inf")
    grad_norm = float(torch.nn.utils.clip_grad_norm_(params, max_norm))
    if scaler is None and not math.isfinite(grad_norm):  # the step would make every weight NaN
        raise FloatingPointError(f"the gradient norm is {grad_norm} though the loss is finite")
    if scaler is not None:
        scaler.step(optimizer)
        scaler.update()
    else:
        optimizer.step()
    return grad_norm


@torch.no_grad()
def evaluate(
    model: nn.Module,
    postprocessor: nn.Module,
    loader: DataLoader,
    coco_gt: COCO,
    *,
    device: torch.device,
    amp: str = "none",
    show_progress: bool = True,
    verbose: bool = False,
    per_class: bool = False,
    class_ids: Iterable[int] = (),
) -> tuple[dict[str, float], list[dict], dict[str, dict[str, float]]]:
    """Detects on every image of ``loader`` (sharded over processes) and scores with COCOeval on rank 0.

    The detections kept are those whose label is a category of ``coco_gt`` or one of ``class_ids`` (the classes the
    model was trained on): per class, pycocotools scores the ground truth's categories only, and the class-agnostic
    row counts every kept detection (a box named as a class the ground truth lacks still finds its object).

    Returns the 12 COCO metrics (identical on every process) and, on rank 0, every detection in the COCO results
    format (boxes xywh in original image pixels) and, with ``per_class``, AP / AP50 per class and class-agnostic
    (:func:`~deformable.data.coco_eval.class_metrics`, from the same COCOeval run as the metrics); other ranks get
    an empty list and an empty dict.
    """
    model.eval()
    per_image: dict[int, list[dict]] = {}
    category_ids = sorted(set(coco_gt.cats) | set(class_ids))
    bar = tqdm(loader, desc="eval", disable=not show_progress, dynamic_ncols=True)
    with torch.random.fork_rng(devices=[]), bar:  # the RNG: evaluating leaves the training stream untouched
        for images, mask, targets in bar:
            with autocast(amp, device):
                outputs = model(images.to(device), mask.to(device))
            sizes = torch.stack([t["orig_size"] for t in targets]).to(device)  # (B, 2) as (h, w)
            results = postprocessor(to_float(outputs), sizes)
            for target, result in zip(targets, results, strict=True):
                image_id = int(target["image_id"])
                per_image[image_id] = to_coco_results(image_id, result, category_ids)
    merged: dict[int, list[dict]] = {}
    for part in distributed.all_gather(per_image):  # every image is in one shard (ShardedBatches)
        merged.update(part)
    detections = [entry for image_id in sorted(merged) for entry in merged[image_id]]
    metrics, table = None, {}
    if distributed.is_main():  # coco_scores copies the detections
        metrics, table = coco_scores(coco_gt, detections, merged.keys(), verbose=verbose, per_class=per_class)
    metrics = distributed.broadcast(metrics)
    return (metrics, detections, table) if distributed.is_main() else (metrics, [], {})


def fit(cfg: Config) -> dict[str, float]:
    """Trains ``cfg`` end to end (data, model, optimiser, resume or finetune, epochs, evaluation, checkpoints,
    ``log.jsonl``), prints and returns the last validation metrics."""
    env = distributed.init_distributed(cfg.train.device)
    try:
        with contextlib.ExitStack() as held:  # the lock of output_dir, until the run ends
            return _fit(cfg, env, held)
    finally:
        distributed.shutdown()


def _fit(cfg: Config, env: DistEnv, held: contextlib.ExitStack) -> dict[str, float]:
    torch.manual_seed(cfg.train.seed + env.rank)
    # Every refusal that needs no data comes first: a refused run writes nothing, nor (re)generates the synthetic set.
    check_options(cfg)
    # Rank 0 decides for all: the other ranks may not see output_dir (checked with a clear message on restoring).
    resume = distributed.broadcast(resume_path(cfg.train.resume, cfg.output_dir) if env.is_main else None)
    refuse_overwrite(cfg.output_dir, resume)
    if env.is_main and resume is None and cfg.train.resume == "auto":  # a first run, or a mistyped output_dir
        print(nothing_to_resume(cfg.output_dir), flush=True)
    start = read_start(cfg, env, resume)  # the checkpoint resumed or fine-tuned from (None: from scratch)
    check_start(cfg, resume, start)
    check_data_location(cfg)
    prepare_data(cfg, env)
    cfg = resolve_data_options(cfg, env)
    data = build_data(cfg, env, checkpoint_names=start and start.class_names, resuming=resume is not None)
    prepare_output_dir(cfg, env, held)  # once the data is read and its images checked: a refused run leaves no folder
    cfg = resolve_num_classes(cfg, data.train_set)
    model = build_model(cfg, env.device, from_checkpoint=resume is not None or bool(cfg.train.finetune))
    trainee = build_trainee(cfg, model)  # the detector and its training-only query aids (if any)
    ema = build_ema(model, cfg.train.ema_decay)  # the weights' moving average (None: off), evaluated and saved
    criterion, postprocessor = build_criterion(cfg).to(env.device), build_postprocessor(cfg)
    optimizer = build_optimizer(trainee, cfg.train)
    scheduler = build_lr_scheduler(optimizer, cfg.train)
    scaler = torch.amp.GradScaler(env.device.type) if cfg.train.amp == "fp16" else None
    start_epoch = _start_epoch(cfg, env, resume, start, trainee, optimizer, scheduler, scaler, ema)
    save_resolved_config(cfg, env)  # once the checkpoint is known to fit: a refused resume leaves the run's file alone
    train_model: nn.Module = trainee
    if env.distributed:
        train_model = DistributedDataParallel(
            trainee,
            device_ids=[env.device] if env.device.type == "cuda" else None,
            # Denoising queries are as many as the rank's largest image has targets: none when its batch has no
            # target, which leaves the denoising parameters out of that rank's graph.
            find_unused_parameters=trainee.aids is not None and trainee.aids.dn_groups > 0,
        )
    step_args = dict(
        device=env.device,
        clip_max_norm=cfg.train.clip_max_norm,
        amp=cfg.train.amp,
        scaler=scaler,
        max_iters=cfg.train.max_iters_per_epoch,
        show_progress=env.is_main,
        ema=ema,
    )
    eval_args = dict(device=env.device, amp=cfg.train.amp, show_progress=env.is_main)

    def run_eval() -> dict[str, float]:
        evaluated_model = model if ema is None else ema.module
        classes = data.train_set.coco.cats  # what the model learns to name
        return evaluate(
            evaluated_model, postprocessor, data.val_loader, data.val_set.coco, class_ids=classes, **eval_args
        )[0]

    logged = log_unlogged_epoch(cfg, env, resume, start, start_epoch, run_eval)  # stopped between save and log
    metrics = logged if logged is not None else {}
    # A run that stopped early stays stopped (unless resumed with a larger train.patience), judged on its log: the
    # resumed config's train.eval_every may not evaluate the epoch it stopped at.
    stopped = 0 < start_epoch < cfg.train.epochs and distributed.broadcast(
        stopped_early(cfg.output_dir, start_epoch - 1, cfg.train.patience) if env.is_main else None
    )
    if env.is_main:
        print(_run_summary(cfg, env, data, trainee, start_epoch, bool(stopped)), flush=True)
        if stopped:
            print(f"{resume}: {stopped}; evaluating it only (a larger train.patience continues it)", flush=True)
    if (start_epoch >= cfg.train.epochs or stopped) and logged is None:
        metrics = run_eval()  # a finished run: report what it reached
    for epoch in range(start_epoch, start_epoch if stopped else cfg.train.epochs):
        began, lr = time.time(), optimizer.param_groups[0]["lr"]
        set_epoch(data.train_loader, epoch, cfg.train.seed, env.rank)
        try:
            stats = train_one_epoch(train_model, criterion, data.train_loader, optimizer, epoch=epoch, **step_args)
        except FloatingPointError as exc:
            raise FloatingPointError(diverged(str(exc), cfg.output_dir, epoch, cfg.train)) from exc
        scheduler.step()
        rngs = distributed.all_gather(rng_state())  # every rank's, so that each resumes its own stream
        if env.is_main:
            names = {int(i): str(c["name"]) for i, c in data.train_set.coco.cats.items()}
            epoch_log = {"lr": lr, "stats": stats, "seconds": time.time() - began}  # logged after evaluation
            state = training_state(
                model,
                optimizer,
                scheduler,
                scaler,
                epoch,
                config_to_dict(cfg),
                rngs,
                names,
                trainee.aids,
                ema,
                epoch_log,
            )
            _save(state, cfg.output_dir, epoch, cfg.train.checkpoint_every)
        # Saved before evaluation, which may fail (an unreadable image) or be killed: the trained epoch is kept.
        # Evaluation draws from no random state the run resumes (its loader has its own generator).
        evaluated = evaluates_after(epoch, cfg.train)
        if evaluated:
            metrics = run_eval()
        if env.is_main:
            if evaluated:
                keep_best(cfg.output_dir, latest_checkpoint(cfg.output_dir), epoch, metrics)
            record = epoch_record(epoch, lr, stats, metrics if evaluated else {}, time.time() - began)
            append_log(os.path.join(cfg.output_dir, LOG_NAME), record)
        stop = distributed.broadcast(stalled(cfg.output_dir, epoch, cfg.train.patience) if env.is_main else None)
        if evaluated and stop and epoch + 1 < cfg.train.epochs:  # judged where the AP was measured
            if env.is_main:
                print(stop, flush=True)
            break
    if env.is_main:
        print(format_metrics(metrics), flush=True)
        best = best_logged(os.path.join(cfg.output_dir, LOG_NAME), BEST_METRIC)
        if best is not None and os.path.isfile(best_checkpoint(cfg.output_dir)):
            print(f"best {BEST_METRIC} {best[0]:.3f} at epoch {best[1]}: {best_checkpoint(cfg.output_dir)}", flush=True)
    return metrics


def _run_summary(
    cfg: Config, env: DistEnv, data: Data, trainee: TrainingDetector, start_epoch: int, stopped: bool
) -> str:
    trainable = sum(p.numel() for p in trainee.detector.parameters() if p.requires_grad)
    aids = ""
    if trainee.aids is not None:
        aids = f" (+ {sum(p.numel() for p in trainee.aids.parameters()):,} of training-only queries)"
    epochs = f"epochs {start_epoch}..{cfg.train.epochs - 1}" if start_epoch < cfg.train.epochs else "no epoch left"
    if stopped:
        epochs = f"stopped early after epoch {start_epoch - 1}: evaluating it only"
    return (
        f"training {cfg.output_dir}: {len(data.train_set)} train / {len(data.val_set)} val images, "
        f"{trainable:,} trainable parameters{aids}, {env.world_size} process(es) on {env.device}, {epochs}"
    )


def _start_epoch(
    cfg: Config,
    env: DistEnv,
    resume: str | None,
    start: Checkpoint | None,
    trainee: TrainingDetector,
    optimizer: torch.optim.Optimizer,
    scheduler: torch.optim.lr_scheduler.LRScheduler,
    scaler: torch.amp.GradScaler | None,
    ema: AveragedModel | None,
) -> int:
    """Restores ``start``, the checkpoint at ``resume``, to resume from (the query aids and the weight average too),
    or loads it, read from ``train.finetune``, into the detector (the aids start afresh, the average from those
    weights); trims ``log.jsonl`` to the epochs before the one training starts at (all of it for a fresh run), or
    starts it from the log of the run whose checkpoint it resumes (:func:`.resume.start_log`)."""
    start_epoch = 0
    if resume is not None and start is not None:
        check_architecture(cfg.model, start)  # names the overrides, where loading would list keys
        check_resumable(start, cfg.train)
        start_epoch = restore_training_state(
            start, trainee.detector, optimizer, scheduler, scaler, env.rank, trainee.aids, ema
        )
    elif start is not None:
        finetune_from(trainee.detector, cfg, start)
        if ema is not None:
            ema.module.load_state_dict(trainee.detector.state_dict())  # the average starts from the loaded weights
    if env.is_main:
        if resume is not None and start_epoch >= cfg.train.epochs:
            print(f"{resume} has trained all {cfg.train.epochs} epochs: evaluating it only", flush=True)
        elif resume is not None and not stopped_early(cfg.output_dir, start_epoch - 1, cfg.train.patience):
            print(f"resuming from {resume} at epoch {start_epoch}", flush=True)  # a stopped run: fit() says so
        start_log(cfg.output_dir, resume, start_epoch)
    return start_epoch


def _save(state: dict[str, Any], output_dir: str, epoch: int, checkpoint_every: int) -> None:
    """``checkpoint.pth`` (latest), plus a ``checkpoint_<epoch>.pth`` copy every ``checkpoint_every`` epochs."""
    latest = latest_checkpoint(output_dir)
    save_checkpoint(state, latest)
    if checkpoint_every > 0 and (epoch + 1) % checkpoint_every == 0:
        copy_checkpoint(latest, os.path.join(output_dir, f"checkpoint_{epoch:04d}.pth"))


def class_table(per_class: dict[str, dict[str, float]]) -> str:
    """:func:`~deformable.data.coco_eval.class_metrics` as a markdown table (-1: no ground truth)."""
    rows = [f"| {name} | {m['AP']:.3f} | {m['AP50']:.3f} |" for name, m in per_class.items()]
    return "\n".join(["| class | AP | AP50 |", "|---|---|---|", *rows])


def evaluate_checkpoint(cfg: Config, checkpoint: str | Checkpoint) -> dict[str, float]:
    """Evaluates ``checkpoint`` (any format :func:`models.read_checkpoint` reads) on the validation split; rank 0
    prints the 12 COCO metrics and a table of AP / AP50 per class and with the classes ignored
    (:func:`~deformable.data.coco_eval.class_metrics`), and writes ``output_dir/eval.json`` (the metrics; the table
    under ``per_class``) and ``output_dir/detections_<val_split>.json`` (COCO results format, in the data set's own
    category ids, so that it scores against the split's annotation file)."""
    if not isinstance(checkpoint, Checkpoint):
        checkpoint = read_checkpoint(checkpoint)
    env = distributed.init_distributed(cfg.train.device)
    try:
        check_data_location(cfg)
        data = build_data(cfg, env, train=False, checkpoint_names=checkpoint.class_names)  # its images checked
        if env.is_main:
            make_dir(cfg.output_dir, "output_dir")  # before the evaluation, not after it
        model = load_detector(cfg, checkpoint)[0].to(env.device)
        metrics, detections, per_class = evaluate(
            model,
            build_postprocessor(cfg),
            data.val_loader,
            data.val_set.coco,
            device=env.device,
            amp=cfg.train.amp,
            show_progress=env.is_main,
            verbose=env.is_main,
            per_class=True,
            class_ids=checkpoint.class_names,
        )
        if env.is_main:
            print(class_table(per_class))
            detections = in_dataset_ids(detections, data.val_set)
            summary = {"checkpoint": checkpoint.path, "split": data.val_set.split, "images": len(data.val_set)}
            summary = {**metrics, **summary, "per_class": per_class}
            written = [os.path.join(cfg.output_dir, "eval.json")]
            written.append(os.path.join(cfg.output_dir, f"detections_{data.val_set.split}.json"))
            write_json(written[0], summary)
            write_json(written[1], detections)
            print(f"wrote {written[0]} and {written[1]}", flush=True)
        return metrics
    finally:
        distributed.shutdown()
