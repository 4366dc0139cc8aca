"""The Pallas kernels inside a sharded jit: run per device shard (shard_map over batch and heads), equal to
the unsharded reference in values and gradients, and without gathering the batch onto every device."""
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest
from jax.sharding import NamedSharding, PartitionSpec as P

from medjax.kernels.dynamic_conv3d import dynamic_head, dynamic_head_reference
from medjax.parallel.mesh import make_mesh
from medjax.kernels.relation_mask import relation_mask_attention, relation_mask_attention_reference


@pytest.fixture(scope="module", params=["auto", "explicit"])
def mesh(request):
    """The trainer's mesh (auto axes, medjax.parallel.mesh) and a sharding-in-types one (explicit axes)."""
    if request.param == "auto":
        return make_mesh(ml_collections.ConfigDict(dict(data=4, fsdp=1, tensor=2, num_devices=8)))
    return jax.make_mesh((4, 1, 2), ("data", "fsdp", "tensor"), axis_types=(jax.sharding.AxisType.Explicit,) * 3)


def _no_gather(compiled) -> bool:
    return "all-gather" not in compiled.as_text()


def test_relation_mask_sharded_over_batch_and_heads(mesh):
    rng = np.random.default_rng(0)
    q, k, v = (jnp.asarray(rng.normal(size=(4, 24, 2, 8)), jnp.float32) for _ in range(3))
    target = jnp.asarray(rng.normal(size=q.shape), jnp.float32)
    spec = NamedSharding(mesh, P("data", None, "tensor", None))
    q_s, k_s, v_s = (jax.device_put(x, spec) for x in (q, k, v))

    def loss(attention, q, k, v):
        return jnp.sum(attention(q, k, v, ratio=0.25) * target)

    kernel = lambda q, k, v, ratio: relation_mask_attention(q, k, v, ratio=ratio, impl="pallas")  # noqa: E731
    with jax.set_mesh(mesh):
        step = jax.jit(jax.value_and_grad(lambda *a: loss(kernel, *a), argnums=(0, 1, 2)))
        jaxpr = str(jax.make_jaxpr(step)(q_s, k_s, v_s))
        compiled = step.lower(q_s, k_s, v_s).compile()
        value, grads = compiled(q_s, k_s, v_s)
    assert "shard_map" in jaxpr
    assert _no_gather(compiled)
    ref_value, ref_grads = jax.value_and_grad(lambda *a: loss(relation_mask_attention_reference, *a), argnums=(0, 1, 2))(q, k, v)
    np.testing.assert_allclose(value, ref_value, rtol=1e-5, atol=1e-5)
    for g, r in zip(grads, ref_grads):
        np.testing.assert_allclose(g, r, rtol=1e-4, atol=1e-5)
    assert grads[0].sharding.spec == P("data", None, "tensor", None)


def test_dynamic_head_sharded_over_batch(mesh):
    rng = np.random.default_rng(1)
    features = jnp.asarray(rng.normal(size=(4, 4, 4, 3, 8)), jnp.float32)
    params = jnp.asarray(rng.normal(size=(4, 3, 153)) * 0.3, jnp.float32)
    features_s = jax.device_put(features, NamedSharding(mesh, P("data")))
    params_s = jax.device_put(params, NamedSharding(mesh, P("data")))

    def loss(head, f, p):
        return jnp.sum(jnp.tanh(head(f, p)))

    kernel = lambda f, p: dynamic_head(f, p, impl="pallas")  # noqa: E731
    with jax.set_mesh(mesh):
        step = jax.jit(jax.value_and_grad(lambda *a: loss(kernel, *a), argnums=(0, 1)))
        compiled = step.lower(features_s, params_s).compile()
        value, grads = compiled(features_s, params_s)
    assert _no_gather(compiled)
    ref_value, ref_grads = jax.value_and_grad(lambda *a: loss(dynamic_head_reference, *a), argnums=(0, 1))(features, params)
    np.testing.assert_allclose(value, ref_value, rtol=1e-5)
    for g, r in zip(grads, ref_grads):
        np.testing.assert_allclose(g, r, rtol=1e-4, atol=1e-5)


def test_no_mesh_and_indivisible_batch_fall_back_to_the_plain_call(mesh):
    """Batch 3 does not divide over 4 data devices: only the heads are split; without a mesh no shard_map."""
    rng = np.random.default_rng(2)
    q, k, v = (jnp.asarray(rng.normal(size=(3, 8, 2, 8)), jnp.float32) for _ in range(3))
    fn = lambda q, k, v: relation_mask_attention(q, k, v, ratio=0.5, impl="pallas")  # noqa: E731
    assert "shard_map" not in str(jax.make_jaxpr(fn)(q, k, v))
    with jax.set_mesh(mesh):
        out = jax.jit(fn)(q, k, v)
    np.testing.assert_allclose(out, relation_mask_attention_reference(q, k, v, ratio=0.5), rtol=1e-5, atol=1e-6)
