"""Detection on images: :class:`Predictor` from Python; reading and preparing images, loading a detector, class
names, COCO results for the tools."""

from models.device import resolve_device

from .images import IMAGE_EXTENSIONS, ImageError, as_rgb, list_images, prepare_batch, read_image
from .predictor import Detections, Predictor, class_names, detect, load_detector

__all__ = [
    "IMAGE_EXTENSIONS",
    "Detections",
    "ImageError",
    "Predictor",
    "as_rgb",
    "class_names",
    "detect",
    "list_images",
    "load_detector",
    "prepare_batch",
    "read_image",
    "resolve_device",
]
