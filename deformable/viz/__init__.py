"""Figures: sampling points of deformable attention over the image (the paper's figure), detections, and training
curves, drawn with OpenCV."""
