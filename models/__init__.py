"""Deformable DETR: the detector, its loss and post-processing, built from a typed config.

from models import load_config, build_detector, build_criterion, build_postprocessor, load_checkpoint
"""

from .backbone import Backbone, Joiner, build_backbone
from .checkpoint import LoadResult, load_checkpoint
from .config import Config, LossConfig, ModelConfig, load_config
from .criterion import SetCriterion, build_criterion
from .deformable_transformer import DeformableTransformer, build_transformer
from .detector import DeformableDETR, build_detector
from .matcher import HungarianMatcher, build_matcher
from .postprocess import PostProcess, build_postprocessor

__all__ = [
    "Backbone",
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
    "load_checkpoint",
    "load_config",
]
