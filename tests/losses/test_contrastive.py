"""ITC (PTUnifier Sec. 3.4): symmetric InfoNCE at a fixed temperature equals a hand computation, and on
8 devices the batch-sharded (global) arrays give the same value as one device and as an explicit
all-gather of the per-device features (the original's `allgather`)."""
import math

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from medjax.losses.contrastive import contrastive_accuracy, contrastive_logits, contrastive_loss


def test_itc_equals_hand_computed_value():
    image = np.array([[3.0, 0.0], [0.0, 2.0]], np.float32)  # normalised: e1, e2
    text = np.array([[1.0, 0.0], [1.0, 1.0]], np.float32)  # normalised: e1, (e1 + e2) / sqrt 2
    s = 1 / math.sqrt(2)
    logits = np.array([[1.0, s], [0.0, s]]) / 0.1  # S_ij = u_i . v_j / tau
    np.testing.assert_allclose(contrastive_logits(image, text, 0.1), logits, rtol=1e-6)
    lse = lambda row: math.log(sum(math.exp(x) for x in row))  # noqa: E731
    image_to_text = ((lse(logits[0]) - logits[0, 0]) + (lse(logits[1]) - logits[1, 1])) / 2
    text_to_image = ((lse(logits[:, 0]) - logits[0, 0]) + (lse(logits[:, 1]) - logits[1, 1])) / 2
    expected = (image_to_text + text_to_image) / 2
    # By hand: rows (10, 7.0711), (0, 7.0711) -> CE 0.052072, 0.000849; columns (10, 0), (7.0711, 7.0711)
    # -> CE 0.0000454, log 2; L = ((0.052072 + 0.000849) / 2 + (0.0000454 + 0.693147) / 2) / 2 = 0.186529.
    assert abs(expected - 0.186529) < 1e-5
    np.testing.assert_allclose(float(contrastive_loss(image, text, 0.1)), expected, rtol=1e-6)
    i2t, t2i = contrastive_accuracy(image, text)
    assert float(i2t) == 1.0 and float(t2i) == 0.5  # text 1 ties images 0 and 1 -> the lower index


def _reference(image, text, temperature):
    u = image / np.linalg.norm(image, axis=1, keepdims=True)
    v = text / np.linalg.norm(text, axis=1, keepdims=True)
    s = (u @ v.T) / temperature
    log_rows = s - np.log(np.exp(s).sum(1, keepdims=True))
    log_cols = s - np.log(np.exp(s).sum(0, keepdims=True))
    return -(np.diag(log_rows).mean() + np.diag(log_cols).mean()) / 2


def test_itc_over_the_global_batch_on_8_devices():
    rng = np.random.default_rng(0)
    image, text = rng.normal(size=(2, 16, 8))
    expected = _reference(image, text, 0.1)
    single = float(jax.jit(contrastive_loss, static_argnums=2)(image.astype(np.float32), text.astype(np.float32), 0.1))
    mesh = Mesh(np.asarray(jax.devices()[:8]), ("data",))
    batch = NamedSharding(mesh, P("data"))
    image_g, text_g = (jax.device_put(x.astype(np.float32), batch) for x in (image, text))
    assert len(image_g.sharding.device_set) == 8 and image_g.addressable_shards[0].data.shape == (2, 8)
    sharded = float(jax.jit(lambda a, b: contrastive_loss(a, b, 0.1), in_shardings=(batch, batch))(image_g, text_g))

    def gathered(a, b):  # the original: all_gather the features, every device computes the full loss
        full_a, full_b = (jax.lax.all_gather(x, "data", tiled=True) for x in (a, b))
        return contrastive_loss(full_a, full_b, 0.1)[None]

    per_device = jax.jit(jax.shard_map(gathered, mesh=mesh, in_specs=(P("data"), P("data")), out_specs=P("data")))(
        image_g, text_g)
    np.testing.assert_allclose([single, sharded], [expected, expected], rtol=1e-5)
    np.testing.assert_allclose(np.asarray(per_device), np.full(8, expected), rtol=1e-5)
    # Not the mean of per-device losses over 2-sample batches: the negatives span all 16 samples.
    local = np.mean([_reference(image[i:i + 2], text[i:i + 2], 0.1) for i in range(0, 16, 2)])
    assert abs(local - expected) > 0.1
