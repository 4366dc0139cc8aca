"""Sliding-window inference equals MONAI's `sliding_window_inference` on the same toy predictor (a
fixed random 3x3x3 conv + tanh in both frameworks), and a direct forward where one window fits."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from monai.data.utils import compute_importance_map, dense_patch_slices
from monai.inferers import sliding_window_inference as monai_sliding_window
from monai.inferers.utils import _get_scan_interval

from medjax.inference.sliding_window import (importance_map, scan_interval, sliding_window_inference,
                                             window_starts)

C_IN, C_OUT = 2, 3
_rng = np.random.default_rng(0)
KERNEL = _rng.normal(size=(3, 3, 3, C_IN, C_OUT)).astype(np.float32) * 0.3  # DHWIO
BIAS = _rng.normal(size=(C_OUT,)).astype(np.float32)
TRACES = {"conv": 0}


def jax_conv(kernel, bias, x):
    TRACES["conv"] += 1  # runs once per trace
    y = jax.lax.conv_general_dilated(x, kernel, (1, 1, 1), "SAME", dimension_numbers=("NDHWC", "DHWIO", "NDHWC"))
    return jnp.tanh(y + bias)


def torch_conv(x):
    weight = torch.from_numpy(KERNEL).permute(4, 3, 0, 1, 2).contiguous()
    return torch.tanh(torch.nn.functional.conv3d(x, weight, torch.from_numpy(BIAS), padding=1))


def monai_reference(volume, window, overlap, batch_size, mode):
    x = torch.from_numpy(volume).permute(3, 0, 1, 2)[None]
    with torch.no_grad():
        out = monai_sliding_window(x, window, batch_size, torch_conv, overlap=overlap, mode=mode)
    return out[0].permute(1, 2, 3, 0).numpy()


@pytest.mark.parametrize("size,window,overlap", [((23, 17, 12), (8, 8, 8), 0.5), ((9, 30, 16), (8, 8, 16), 0.25),
                                                 ((5, 6, 100), (16, 16, 16), 0.5)])
def test_scan_interval_starts_and_map_match_monai(size, window, overlap):
    padded = tuple(max(s, w) for s, w in zip(size, window))
    interval = scan_interval(padded, window, overlap)
    assert interval == _get_scan_interval(padded, window, 3, (overlap,) * 3)
    starts = window_starts(padded, window, interval)
    monai_starts = [tuple(s.start for s in sl) for sl in dense_patch_slices(padded, window, interval)]
    assert [tuple(s) for s in starts.tolist()] == monai_starts
    ref = compute_importance_map(window, mode="gaussian", sigma_scale=0.125).numpy()
    np.testing.assert_allclose(importance_map(window, "gaussian", 0.125), ref, rtol=1e-6, atol=1e-7)
    assert importance_map(window).min() == pytest.approx(max(ref.min(), 1e-3))


@pytest.mark.parametrize("size,window,overlap,batch_size,mode", [
    ((21, 17, 13), (8, 8, 8), 0.5, 3, "gaussian"),  # not divisible; 3 windows per batch leaves a padded batch
    ((19, 6, 11), (8, 8, 8), 0.25, 2, "constant"),  # one axis smaller than the window: padded and cropped
    ((20, 17, 13), (8, -1, 8), 0.5, 4, "gaussian"),  # a non-positive window axis takes the volume's size
])
def test_equals_monai_sliding_window(size, window, overlap, batch_size, mode):
    volume = np.random.default_rng(1).normal(size=size + (C_IN,)).astype(np.float32)
    ours = sliding_window_inference(jax_conv, volume, KERNEL, BIAS, window=window, overlap=overlap,
                                    batch_size=batch_size, mode=mode, cpu_batch_size=None)
    ref = monai_reference(volume, window, overlap, batch_size, mode)
    assert ours.shape == size + (C_OUT,) == ref.shape
    np.testing.assert_allclose(np.asarray(ours), ref, atol=2e-6, rtol=1e-5)


def test_equals_direct_forward_where_one_window_fits():
    volume = np.random.default_rng(2).normal(size=(8, 8, 8, C_IN)).astype(np.float32)
    ours = sliding_window_inference(jax_conv, volume, KERNEL, BIAS, window=(8, 8, 8), batch_size=2)
    direct = jax_conv(KERNEL, BIAS, jnp.asarray(volume)[None])[0]
    np.testing.assert_allclose(np.asarray(ours), np.asarray(direct), atol=1e-6)


def pointwise(weight, x):
    return jax.nn.sigmoid(x @ weight)


def test_pointwise_model_on_a_volume_not_divisible_by_the_window_equals_one_forward():
    """A per-voxel model gives the same logits in every window, so the blend is the forward itself."""
    volume = np.random.default_rng(3).normal(size=(21, 13, 10, C_IN)).astype(np.float32)
    weight = jnp.asarray(KERNEL[1, 1, 1])
    ours = sliding_window_inference(pointwise, volume, weight, window=(8, 8, 8), batch_size=3)  # CPU: 1 a call
    np.testing.assert_allclose(np.asarray(ours), np.asarray(pointwise(weight, volume)), atol=1e-6)
    batched = sliding_window_inference(pointwise, volume, weight, window=(8, 8, 8), batch_size=3, cpu_batch_size=None)
    np.testing.assert_allclose(np.asarray(batched), np.asarray(ours), atol=1e-6)


def test_model_compiles_once_per_window_and_batch_shape():
    before = TRACES["conv"]
    for size in ((17, 9, 9), (12, 20, 9), (9, 9, 30)):
        volume = np.zeros(size + (C_IN,), np.float32)
        sliding_window_inference(jax_conv, volume, KERNEL, BIAS, window=(8, 8, 8), batch_size=5, cpu_batch_size=5)
    assert TRACES["conv"] - before == 1


def test_bad_inputs():
    with pytest.raises(ValueError, match="channels-last"):
        sliding_window_inference(jax_conv, np.zeros((8, 8, 8)), KERNEL, BIAS, window=(8, 8, 8))
    with pytest.raises(ValueError, match="overlap"):
        sliding_window_inference(jax_conv, np.zeros((8, 8, 8, 2)), KERNEL, BIAS, window=(4, 4, 4), overlap=1.0)
    with pytest.raises(ValueError, match="mode"):
        importance_map((4, 4, 4), "cosine")
    with pytest.raises(ValueError, match="apply_fn must map"):
        sliding_window_inference(lambda x: x[:, ::2], np.zeros((8, 8, 8, 2)), window=(4, 4, 4))


def test_bench_alternates_the_implementations_it_times():
    """`python -m medjax.bench sliding-window` times medjax and MONAI in alternating rounds (first calls, then
    warmup rounds, then timed rounds) and reports each side's median and first output."""
    from medjax.bench.sliding_window import _interleaved_timings

    calls = []

    def runner(name):
        def run():
            calls.append(name)
            return len(calls)
        return run

    timings = _interleaved_timings({"medjax": runner("medjax"), "monai": runner("monai")}, warmup=1, iters=3)
    assert calls == ["medjax", "monai"] * 5
    assert set(timings) == {"medjax", "monai"}
    first, median, output = timings["monai"]
    assert output == 2 and first >= 0.0 and median >= 0.0
