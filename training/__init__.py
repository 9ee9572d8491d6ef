"""Training and evaluation of Deformable DETR on the data sets of :mod:`deformable.data` (COCO, Roboflow, YOLO, VOC).

``engine`` (the loop: train_one_epoch, evaluate, fit), ``checkpoint`` (atomic save, resume), ``coco_eval``,
``distributed``, ``optim``, ``build`` (run setup) and ``run_log`` (log.jsonl, eval.json). The tools in ``tools/`` are
the entry points.
"""
