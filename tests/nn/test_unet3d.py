"""Models-Genesis UNet3D of the Universal Model: the original's always-batch-statistics BatchNorm gives the
PyTorch restatement's logits through the converter; the running-average option trains on batch statistics,
updates the averages with momentum 0.1 and evaluates with them like torch BatchNorm3d.eval()."""
import functools

import numpy as np
import pytest

import monai  # noqa: E402,F401  (the test extra, monai==1.6.1: the original's MONAI blocks)
import torch  # noqa: E402  (the torch test extra, torch==2.13.0 CPU build)

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402

from medjax.convert import torch_universal, universal  # noqa: E402
from medjax.nn.unet3d import UNet3DBackbone  # noqa: E402


@pytest.fixture(scope="module")
def unet_case():
    torch.manual_seed(0)
    net = torch_universal.universal_torch("unet", encoding="rand_embedding").eval()
    x = torch.from_numpy(np.random.default_rng(0).standard_normal((2, 1, 16, 16, 16), dtype=np.float32))
    state = {k: v.numpy().copy() for k, v in net.state_dict().items()}  # running stats before any forward
    with torch.no_grad():
        logits = net(x).numpy()  # ContBatchNorm3d: batch statistics (and running-stat updates) even in eval()
    return net, state, x, logits


def _channels_last(t):
    return jnp.asarray(t.numpy().transpose(0, 2, 3, 4, 1))


def test_unet_universal_logits_match_the_original(unet_case):
    net, state, x, expected = unet_case
    model, variables, report = universal.convert_state_dict(state, "unet")
    assert model.encoding == "rand_embedding" and "batch_stats" not in variables
    assert all(k.endswith(("running_mean", "running_var", "num_batches_tracked")) for k in report.ignored)
    assert len(report.ignored) == 3 * 14  # 14 BatchNorms, unused by the batch-statistics BatchNorm
    dec4, out = jax.eval_shape(model.backbone.apply, {"params": variables["params"]["backbone"]}, _channels_last(x))
    assert dec4.shape == (2, 2, 2, 2, 512) and out.shape == (2, 16, 16, 16, 64)
    got = np.asarray(jax.jit(model.apply)(variables, _channels_last(x))).transpose(0, 4, 1, 2, 3)
    assert got.shape == expected.shape == (2, 32, 16, 16, 16)
    np.testing.assert_allclose(got, expected, atol=1e-4, rtol=1e-4)


def test_running_average_batchnorm(unet_case):
    net, _, x, _ = unet_case
    state = {k: v.numpy() for k, v in net.state_dict().items()}  # running stats after one forward
    model, variables, report = universal.convert_state_dict(state, "unet", batch_stats_always=False)
    assert not any("running" in k for k in report.ignored)
    backbone = {c: variables[c]["backbone"] for c in ("params", "batch_stats")}
    stats = backbone["batch_stats"]["down_tr64"]["ops_0"]["bn1"]
    np.testing.assert_array_equal(stats["mean"], net.backbone.down_tr64.ops[0].bn1.running_mean.numpy())
    xl = _channels_last(x)
    # Jitted applies: one compile each instead of one per op of the 14-conv network.
    (dec4, out), updates = jax.jit(functools.partial(model.backbone.apply, train=True, mutable=["batch_stats"]))(
        backbone, xl)
    always = jax.jit(UNet3DBackbone(batch_stats_always=True).apply)({"params": backbone["params"]}, xl)
    np.testing.assert_allclose(np.asarray(out), np.asarray(always[1]), atol=5e-5)  # two BN formulas, rounding
    with torch.no_grad():
        conv = net.backbone.down_tr64.ops[0].conv1(x)
    batch_mean = conv.mean(dim=(0, 2, 3, 4)).numpy()
    np.testing.assert_allclose(updates["batch_stats"]["down_tr64"]["ops_0"]["bn1"]["mean"],
                               0.9 * stats["mean"] + 0.1 * batch_mean, atol=1e-5)
    for module in net.modules():  # the same network with standard BatchNorm3d in eval mode
        if type(module).__name__ == "ContBatchNorm3d":
            module.__class__ = torch.nn.BatchNorm3d
    with torch.no_grad():
        expected_dec4, expected_out = net.backbone.eval()(x)
    dec4, out = jax.jit(functools.partial(model.backbone.apply, train=False))(backbone, xl)
    np.testing.assert_allclose(np.asarray(out).transpose(0, 4, 1, 2, 3), expected_out.numpy(), atol=1e-4, rtol=1e-4)
    np.testing.assert_allclose(np.asarray(dec4).transpose(0, 4, 1, 2, 3), expected_dec4.numpy(), atol=1e-4, rtol=1e-4)


def test_input_must_be_a_multiple_of_8():
    with pytest.raises(ValueError, match="multiple of 8"):
        jax.eval_shape(lambda x: UNet3DBackbone().init(jax.random.key(0), x),
                       jax.ShapeDtypeStruct((1, 16, 12, 16, 1), jnp.float32))
