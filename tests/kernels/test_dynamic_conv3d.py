"""The Universal Model's dynamic head: the reference against the original's parameter layout,
and the Pallas kernel (interpret mode on CPU) against the reference, forward and gradients."""
from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from medjax.kernels.dynamic_conv3d import (
    PARAMS_PER_CLASS,
    DynamicHeadBlockSizes,
    dynamic_head,
    dynamic_head_pallas,
    dynamic_head_reference,
)


def _inputs(batch, shape, classes, seed=0):
    keys = jax.random.split(jax.random.key(seed), 3)
    features = jax.random.normal(keys[0], (batch, *shape, 8), jnp.float32)
    params = jax.random.normal(keys[1], (batch, classes, PARAMS_PER_CLASS), jnp.float32) * 0.5
    cotangent = jax.random.normal(keys[2], (batch, *shape, classes), jnp.float32)
    return features, params, cotangent


def _output_and_grads(fn, features, params, cotangent):
    def run(features, params):
        out, pullback = jax.vjp(fn, features, params)
        return out, pullback(cotangent)
    return jax.jit(run)(features, params)


def test_reference_follows_the_original_parameter_split():
    """Universal_model.py parse_dynamic_params: weights [64, 64, 8] then biases [8, 8, 1];
    each weight reshaped (out=8, in=8) row-major; heads_forward = conv, relu, conv, relu, conv."""
    rng = np.random.default_rng(0)
    features = rng.normal(size=(1, 2, 3, 2, 8)).astype(np.float32)
    params = rng.normal(size=(1, 3, PARAMS_PER_CLASS)).astype(np.float32)
    out = np.asarray(dynamic_head_reference(jnp.asarray(features), jnp.asarray(params)))
    x = features.reshape(-1, 8)
    for c in range(3):
        p = params[0, c]
        w1, w2, w3 = p[0:64].reshape(8, 8), p[64:128].reshape(8, 8), p[128:136].reshape(1, 8)
        b1, b2, b3 = p[136:144], p[144:152], p[152:153]
        h = np.maximum(x @ w1.T + b1, 0.0)
        h = np.maximum(h @ w2.T + b2, 0.0)
        expected = (h @ w3.T + b3)[:, 0]
        np.testing.assert_allclose(out[..., c].reshape(-1), expected, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize(
    "batch, shape, classes, blocks",
    [
        # voxels (105) not divisible by the tile, classes (5) not by the chunk (2 chunks of 3),
        # 2 backward programs of 4 tiles each
        (2, (3, 5, 7), 5, DynamicHeadBlockSizes(block_voxels=16, chunk_classes=3, backward_voxels=64)),
        # the CPU defaults: one tile, all classes in one chunk
        (1, (4, 4, 4), 3, None),
    ],
)
def test_kernel_matches_reference_forward_and_gradients(batch, shape, classes, blocks):
    features, params, cotangent = _inputs(batch, shape, classes)
    ref_out, (ref_dx, ref_dp) = _output_and_grads(dynamic_head_reference, features, params, cotangent)
    out, (dx, dp) = _output_and_grads(
        lambda x, p: dynamic_head(x, p, impl="pallas", block_sizes=blocks), features, params, cotangent)
    assert out.shape == (batch, *shape, classes) and dx.shape == features.shape and dp.shape == params.shape
    np.testing.assert_allclose(out, ref_out, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(dx, ref_dx, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(dp, ref_dp, rtol=1e-5, atol=1e-4)


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16])
def test_cpu_fused_head_matches_reference_forward_and_gradients(dtype):
    """impl="auto" on CPU: the unrolled one-fusion forward gives the reference's numbers and dtype, and
    its gradients (recomputed per chunk of classes) are the reference's."""
    from medjax.kernels.dynamic_head_fused import dynamic_head_fused

    features, params, cotangent = _inputs(2, (3, 4, 5), 6, seed=2)
    features, params, cotangent = features.astype(dtype), params.astype(dtype), cotangent.astype(dtype)
    ref_out, (ref_dx, ref_dp) = _output_and_grads(dynamic_head_reference, features, params, cotangent)
    out, (dx, dp) = _output_and_grads(lambda x, p: dynamic_head(x, p, impl="auto"), features, params, cotangent)
    assert out.dtype == ref_out.dtype == dtype and dx.dtype == dp.dtype == dtype
    tol = 1e-5 if dtype == jnp.float32 else 1e-2
    np.testing.assert_allclose(np.float32(out), np.float32(ref_out), rtol=tol, atol=tol)
    # the reference's backward, recomputed 3 classes at a time (6 classes): dfeatures summed over the 2 chunks
    grad_tol = 1e-5 if dtype == jnp.float32 else 2e-2
    np.testing.assert_allclose(np.float32(dx), np.float32(ref_dx), rtol=grad_tol, atol=grad_tol)
    np.testing.assert_allclose(np.float32(dp), np.float32(ref_dp), rtol=grad_tol, atol=grad_tol)
    plain = jax.jit(dynamic_head_fused)(features, params)  # not differentiated: the fused form
    np.testing.assert_allclose(np.float32(plain), np.float32(ref_out), rtol=tol, atol=tol)
    with pytest.raises(ValueError, match="dynamic_head_fused: params must be"):
        dynamic_head_fused(features, params[:1])


def test_backward_chunk_divides_the_classes():
    from medjax.kernels.dynamic_head_fused import backward_chunk

    assert [backward_chunk(k) for k in (32, 6, 7, 1, 2)] == [4, 3, 1, 1, 2]


def test_dispatcher_and_errors():
    features, params, _ = _inputs(1, (2, 2, 2), 2, seed=1)
    reference = dynamic_head_reference(features, params)
    np.testing.assert_allclose(dynamic_head(features, params, impl="auto"), reference, rtol=1e-6, atol=1e-6)
    np.testing.assert_array_equal(dynamic_head(features, params, impl="reference"), reference)
    with pytest.raises(ValueError, match="kernels.impl"):
        dynamic_head(features, params, impl="cuda")
    with pytest.raises(ValueError, match=r"features must be \(batch, D, H, W, 8\)"):
        dynamic_head(features[..., :4], params, impl="pallas")
    with pytest.raises(ValueError, match="153"):
        dynamic_head(features, params[..., :150], impl="reference")
    with pytest.raises(ValueError, match="power of two"):
        dynamic_head_pallas(features, params, backend="gpu", block_sizes=DynamicHeadBlockSizes(chunk_classes=3))


@pytest.mark.parametrize("backend, platform", [("gpu", "cuda"), ("tpu", "tpu")])
def test_lowers_for_gpu_and_tpu(backend, platform):
    """The real Triton / Mosaic paths (not interpret mode) trace and lower, forward and backward."""
    features = jax.ShapeDtypeStruct((2, 16, 16, 16, 8), jnp.float32)
    params = jax.ShapeDtypeStruct((2, 32, PARAMS_PER_CLASS), jnp.float32)

    def loss(x, p):
        return jnp.sum(dynamic_head_pallas(x, p, backend=backend, interpret=False))

    text = jax.jit(jax.grad(loss, argnums=(0, 1))).trace(features, params).lower(
        lowering_platforms=(platform,)).as_text()
    marker = "__gpu$xla.gpu.triton" if backend == "gpu" else "tpu_custom_call"
    assert text.count(marker) >= 2  # forward and backward kernels


def test_bench_main_prints_a_table(capsys):
    from medjax.bench import dynamic_conv3d as bench

    bench.main(["--sizes", "4", "--classes", "3", "--batch", "1", "--iters", "1", "--warmup", "0"])
    lines = capsys.readouterr().out.strip().splitlines()
    rows = [line for line in lines if line.startswith("| 4^3")]
    assert [row.split(" | ")[1] for row in rows] == ["fwd", "fwd+bwd"]
    assert all(float(row.rstrip(" |").split(" | ")[-1]) < 1e-5 for row in rows)  # kernel vs reference
