"""Training and evaluation of Deformable DETR on the data sets of :mod:`deformable.data` (COCO, Roboflow, YOLO, VOC).

``engine`` (the loop: train_one_epoch, evaluate, fit), ``build`` (run setup: data, model, output folder),
``start`` (the checkpoint ``train.resume`` names, what a run refuses to overwrite), ``resume`` (the training state a
checkpoint holds), ``stops`` (early stopping, divergence, Ctrl-C: what continues a run), ``distributed``, ``optim``
and ``run_log`` (log.jsonl, eval.json). COCO evaluation is :mod:`deformable.data.coco_eval`; checkpoints are
:mod:`models.checkpoint`. The tools in ``tools/`` are the entry points; from Python, :func:`fit` is what
``tools/train.py`` runs and :func:`evaluate_checkpoint` what ``tools/eval.py`` runs.
"""

from .engine import evaluate_checkpoint, fit

__all__ = ["evaluate_checkpoint", "fit"]
