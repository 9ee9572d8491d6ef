"""Shared by the training tests: a tiny model and data set on top of configs/shapes.yaml."""

from __future__ import annotations

from _repo import config_path

from models.config import Config, load_config

SHAPES_CONFIG = config_path("shapes.yaml")

TINY_MODEL = [
    "model.backbone=resnet18",
    "model.pretrained_backbone=false",
    "model.num_feature_levels=2",
    "model.enc_layers=1",
    "model.dec_layers=2",
    "model.dim_feedforward=64",
    "model.hidden_dim=32",
    "model.nheads=2",
    "model.num_queries=5",
    "model.num_classes=4",
]
TINY_DATA = [
    "data.synthetic=shapes",
    "data.crop=true",
    "data.synthetic_train_images=8",
    "data.synthetic_val_images=4",
    "data.synthetic_image_size=64",
    "data.synthetic_max_objects=2",
    "data.train_scales=[48,64]",
    "data.train_max_size=96",
    "data.crop_scales=[56,64]",
    "data.crop_size=[32,48]",
    "data.val_size=64",
    "data.val_max_size=96",
    "data.num_workers=0",
]
TINY_TRAIN = [
    "train.epochs=1",
    "train.batch_size=2",
    "train.max_iters_per_epoch=2",
    "train.eval_every=1",
    "train.checkpoint_every=0",
    "train.device=cpu",
    "training_queries.dn_groups=0",  # the plain path; shapes.yaml's denoising is tested with its options
]


def tiny_overrides(data_root: str, output_dir: str, *extra: str) -> list[str]:
    return [*TINY_MODEL, *TINY_DATA, *TINY_TRAIN, f"data.root={data_root}", f"output_dir={output_dir}", *extra]


def tiny_config(data_root: str, output_dir: str, *extra: str) -> Config:
    return load_config(SHAPES_CONFIG, tiny_overrides(data_root, output_dir, *extra))
