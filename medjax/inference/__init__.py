"""Inference on whole volumes: sliding-window prediction, the Universal Model's post-processing and
its evaluation (Dice / NSD tables)."""
from medjax.inference.sliding_window import sliding_window_inference

__all__ = ["sliding_window_inference"]
