"""Deformable DETR: the detector, its loss and post-processing, built from a typed config.

from models import load_config, build_detector, build_criterion, build_postprocessor, load_checkpoint
    from models import read_checkpoint, load_detector, resolve_config     # any checkpoint format, its config
"""

from .backbone import Backbone, Joiner, build_backbone
from .checkpoint import Checkpoint, CheckpointError, read_checkpoint, save_checkpoint
from .config import Config, LossConfig, ModelConfig, load_config
from .criterion import SetCriterion, build_criterion
from .deformable_transformer import DeformableTransformer, build_transformer
from .detector import DeformableDETR, build_detector
from .loading import config_and_checkpoint, config_from_checkpoint, load_detector, resolve_config
from .matcher import HungarianMatcher, build_matcher
from .postprocess import PostProcess, build_postprocessor
from .weights import LoadResult, load_checkpoint

__all__ = [
    "Backbone",
    "Checkpoint",
    "CheckpointError",
    "Config",
    "DeformableDETR",
    "DeformableTransformer",
    "HungarianMatcher",
    "Joiner",
    "LoadResult",
    "LossConfig",
    "ModelConfig",
    "PostProcess",
    "SetCriterion",
    "build_backbone",
    "build_criterion",
    "build_detector",
    "build_matcher",
    "build_postprocessor",
    "build_transformer",
    "config_and_checkpoint",
    "config_from_checkpoint",
    "load_checkpoint",
    "load_config",
    "load_detector",
    "read_checkpoint",
    "resolve_config",
    "save_checkpoint",
]
