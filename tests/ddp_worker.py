"""Run by the torchrun tests (test_training_distributed.py, test_training_query_aids.py): trains like
tools/train.py, then saves this rank's final trainee parameters (``detector.*`` and, with training-only query aids,
``aids.*``) to ``PARAMS_DIR/rank<r>.pth``, and with ``train.ema_decay`` its weight average's to
``PARAMS_DIR/ema<r>.pth``, so the test can compare the ranks.

    torchrun --nproc_per_node=2 tests/ddp_worker.py PARAMS_DIR CONFIG [section.key=value ...]
"""

from __future__ import annotations

import os
import sys

import torch

from deformable.training import engine
from models.config import load_config


def main() -> None:
    params_dir, config, *overrides = sys.argv[1:]
    built, averages = [], []
    build_trainee, build_ema = engine.build_trainee, engine.build_ema
    engine.build_trainee = lambda *args, **kwargs: built.append(build_trainee(*args, **kwargs)) or built[-1]
    engine.build_ema = lambda *args, **kwargs: averages.append(build_ema(*args, **kwargs)) or averages[-1]
    engine.fit(load_config(config, overrides))
    rank = os.environ["RANK"]
    torch.save(built[0].state_dict(), os.path.join(params_dir, f"rank{rank}.pth"))
    if averages[0] is not None:
        torch.save(averages[0].module.state_dict(), os.path.join(params_dir, f"ema{rank}.pth"))


if __name__ == "__main__":
    main()
