"""`remat=True` recomputes block activations in backward: same params, same loss, same gradients."""
import jax
import jax.numpy as jnp
import numpy as np

from medjax.nn.vit import ViTEncoder


def test_remat_changes_nothing_but_memory():
    kwargs = dict(image_size=16, patch_size=8, width=16, depth=2, num_heads=2, drop_path=0.1)
    plain, remat = ViTEncoder(**kwargs), ViTEncoder(**kwargs, remat=True)
    images = jax.random.normal(jax.random.PRNGKey(1), (2, 16, 16, 3))
    params = jax.jit(plain.init)(jax.random.PRNGKey(0), images)["params"]  # jitted: one compile, not one per op
    remat_shapes = jax.eval_shape(remat.init, jax.random.PRNGKey(0), images)["params"]
    assert jax.tree.structure(remat_shapes) == jax.tree.structure(params)

    def loss(module, p):
        out = module.apply({"params": p}, images, train=True, rngs={"dropout": jax.random.PRNGKey(2)})
        return jnp.mean(out ** 2)

    value_and_grad = jax.jit(jax.value_and_grad(loss, argnums=1), static_argnums=0)  # as a train step runs it
    (a, ga), (b, gb) = (value_and_grad(m, params) for m in (plain, remat))
    np.testing.assert_allclose(a, b, rtol=1e-6)
    for x, y in zip(jax.tree.leaves(ga), jax.tree.leaves(gb), strict=True):
        np.testing.assert_allclose(x, y, rtol=1e-5, atol=1e-6)  # recomputation reorders float ops
