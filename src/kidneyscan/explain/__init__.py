"""Explanations of model decisions (Grad-CAM heatmaps via pytorch-grad-cam)."""
