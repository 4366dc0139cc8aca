"""Whole-slide-image preprocessing as CLAM does it: tissue segmentation and tile coordinates (HDF5)."""
