"""Detection on images and videos: :class:`Predictor` from Python; reading and preparing images and video frames,
loading a detector, class names, COCO results for the tools."""

from models.device import resolve_device

from .images import IMAGE_EXTENSIONS, ImageError, as_rgb, list_images, prepare_batch, read_image
from .predictor import Detections, Predictor, VideoFrame, class_names, detect, load_detector
from .video import VIDEO_EXTENSIONS, read_frames, video_info

__all__ = [
    "IMAGE_EXTENSIONS",
    "VIDEO_EXTENSIONS",
    "Detections",
    "ImageError",
    "Predictor",
    "VideoFrame",
    "as_rgb",
    "class_names",
    "detect",
    "list_images",
    "load_detector",
    "prepare_batch",
    "read_frames",
    "read_image",
    "resolve_device",
    "video_info",
]
