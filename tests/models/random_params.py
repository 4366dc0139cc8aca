"""Random params of a model's init shapes, drawn on the host: tests that need some sane values (not the
init's) skip compiling the init. A LayerNorm scale near 1, a bias near 0, embeddings / prompt pools / vectors
~ N(0, 0.02), kernels ~ N(0, 1 / fan_in)."""
from __future__ import annotations

import flax.linen as nn
import jax
import numpy as np

SMALL = ("embedding", "pool", "class_embedding", "position_embedding")


def draw(rng: np.random.Generator, name: str, shape) -> np.ndarray:
    noise = rng.normal(size=shape)
    if name == "scale":
        value = 1.0 + 0.1 * noise
    elif name == "bias":
        value = 0.1 * noise
    elif name in SMALL or len(shape) < 2:
        value = 0.02 * noise
    else:
        value = noise / np.sqrt(shape[0])
    return value.astype(np.float32)


def random_params(abstract, seed: int = 0):
    """Host float32 arrays for the (possibly boxed) `jax.eval_shape(init)` tree `abstract`."""
    rng = np.random.default_rng(seed)
    return jax.tree_util.tree_map_with_path(lambda path, s: draw(rng, str(getattr(path[-1], "key", path[-1])), s.shape),
                                            nn.unbox(abstract))
