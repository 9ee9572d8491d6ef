"""Detection on image files: reading and preparing images, loading a detector, class names, COCO results."""

from .images import IMAGE_EXTENSIONS, ImageError, list_images, prepare_batch, read_image
from .predictor import class_names, detect, load_detector, resolve_device

__all__ = [
    "IMAGE_EXTENSIONS",
    "ImageError",
    "class_names",
    "detect",
    "list_images",
    "load_detector",
    "prepare_batch",
    "read_image",
    "resolve_device",
]
