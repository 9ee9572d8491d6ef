"""Training and evaluation of Deformable DETR on COCO-layout data sets.

``data`` (COCO reading, batching), ``transforms`` (the original's augmentation), ``shapes`` (the synthetic demo data
set), ``engine`` (the loop: train_one_epoch, evaluate, fit), ``checkpoint`` (atomic save, resume), ``coco_eval``,
``distributed``, ``optim``, ``build`` (run setup) and ``run_log`` (log.jsonl, eval.json). The tools in ``tools/`` are
the entry points.
"""
