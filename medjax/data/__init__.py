"""File readers, transforms and Grain pipelines. `read_image` is the one image reader of every family."""
from medjax.data.readers.image_io import read_image

__all__ = ["read_image"]
