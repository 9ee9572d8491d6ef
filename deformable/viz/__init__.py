"""Figures: sampling points of deformable attention over the image (the paper's figure), detections, and training
curves (matplotlib; the rest is drawn with OpenCV)."""
