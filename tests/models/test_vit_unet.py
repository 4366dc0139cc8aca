"""The ResNet-50 U-Net head on the ViT (medjax/models/vit_unet.py): ContIG's decoder channel plan at ResNet-50's
widths, the pyramid strides, the transposed conv against its definition, and ContIG's PALM loss."""
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from medjax.losses.segmentation import pooled_bce_dice
from medjax.models.vit_unet import ConvTranspose2x, ViTUNet


def kernel_shapes(model, size):
    shapes = jax.eval_shape(lambda: model.init(jax.random.PRNGKey(0), jnp.zeros((1, size, size, 3)), train=False))
    flat = jax.tree_util.tree_flatten_with_path(nn.unbox(shapes["params"]))[0]
    return {"/".join(str(k.key) for k in path[:-1]): leaf.shape for path, leaf in flat if path[-1].key == "kernel"}


def test_contig_unet_channel_plan_at_resnet50_widths():
    model = ViTUNet(image_size=224, patch_size=16, width=768, depth=12, num_heads=12)
    shapes = kernel_shapes(model, 224)
    # ContIG's UNetWithResnet50Encoder: Bridge(2048, 2048), up blocks 2048->1024, 1024->512, 512->256,
    # (128 + 64)->128 from 256, (64 + 3)->64 from 128, out 1x1 -> 2; ResNet-50's conv1 7x7/2 3->64.
    expected = {
        "stem_conv": (7, 7, 3, 64), "bridge_0/conv": (3, 3, 2048, 2048), "bridge_1/conv": (3, 3, 2048, 2048),
        "up_0/upsample": (2, 2, 2048, 1024), "up_0/conv_block_1/conv": (3, 3, 2048, 1024),
        "up_1/upsample": (2, 2, 1024, 512), "up_1/conv_block_1/conv": (3, 3, 1024, 512),
        "up_2/upsample": (2, 2, 512, 256), "up_2/conv_block_1/conv": (3, 3, 512, 256),
        "up_3/upsample": (2, 2, 256, 128), "up_3/conv_block_1/conv": (3, 3, 128 + 64, 128),
        "up_4/upsample": (2, 2, 128, 64), "up_4/conv_block_1/conv": (3, 3, 64 + 3, 64),
        "up_4/conv_block_2/conv": (3, 3, 64, 64), "out": (1, 1, 64, 2),
        # ViT-B/16 blocks 3, 6, 9, 12 -> strides 4, 8, 16, 32 at ResNet-50's stage widths
        "pyramid_0/up_0": (2, 2, 768, 256), "pyramid_0/up_1": (2, 2, 256, 256), "pyramid_1/up_0": (2, 2, 768, 512),
        "pyramid_2/proj": (1, 1, 768, 1024), "pyramid_3/proj": (2, 2, 768, 2048),
    }
    for name, shape in expected.items():
        assert shapes[name] == shape, name
    assert model.stage_blocks() == [3, 6, 9, 12]
    assert "encoder/patch_embed/proj" in "|".join(shapes)  # the MRM / MAE encoder loads under `encoder`


def test_tiny_shapes_and_image_size_check():
    """(The forward pass, training and BatchNorm's running averages run in tests/test_train_mrm_transfer.py.)"""
    model = ViTUNet(image_size=32, patch_size=8, width=16, depth=2, num_heads=2, widths=(4, 8, 8, 8, 8))
    variables = jax.eval_shape(lambda: model.init(jax.random.PRNGKey(0), jnp.zeros((2, 32, 32, 3)), train=False))
    logits, updated = jax.eval_shape(lambda v: model.apply(v, jnp.zeros((2, 32, 32, 3)), train=True,
                                                           mutable=["batch_stats"]), variables)
    assert logits.shape == (2, 32, 32, 2) and logits.dtype == jnp.float32
    assert jax.tree.map(lambda a: a.shape, updated["batch_stats"]) == jax.tree.map(lambda a: a.shape,
                                                                                  variables["batch_stats"])
    assert model.stage_blocks() == [1, 1, 2, 2]
    with pytest.raises(ValueError, match="multiple of 32"):
        jax.eval_shape(lambda: ViTUNet(image_size=48, patch_size=8, width=16, depth=2, num_heads=2).init(
            jax.random.PRNGKey(0), jnp.zeros((1, 48, 48, 3)), train=False))


def test_conv_transpose_is_its_definition():
    rng = np.random.default_rng(1)
    x = rng.normal(size=(1, 2, 3, 4)).astype(np.float32)
    module = ConvTranspose2x(5)
    params = nn.unbox(module.init(jax.random.PRNGKey(0), x)["params"])
    params = dict(params, bias=jnp.asarray(rng.normal(size=5), jnp.float32))
    out = np.asarray(module.apply({"params": params}, x))
    kernel, bias = np.asarray(params["kernel"]), np.asarray(params["bias"])
    for i in range(2):
        for j in range(3):
            for a in range(2):
                for b in range(2):  # ConvTranspose2d(k=2, s=2): out[2i + a, 2j + b] = x[i, j] @ W[a, b] + bias
                    np.testing.assert_allclose(out[0, 2 * i + a, 2 * j + b], x[0, i, j] @ kernel[a, b] + bias,
                                               rtol=1e-5, atol=1e-5)


def test_pooled_bce_dice_is_contigs_loss():
    rng = np.random.default_rng(2)
    logits = rng.normal(size=(2, 6, 6, 2)).astype(np.float32)
    labels = (rng.random((2, 6, 6, 2)) < 0.3).astype(np.float32)
    loss, parts = pooled_bce_dice(jnp.asarray(logits), jnp.asarray(labels))
    p = 1 / (1 + np.exp(-logits.astype(np.float64)))
    bce = np.mean(-(labels * np.log(p) + (1 - labels) * np.log(1 - p)))  # BCEWithLogitsLoss()
    dice = 1 - (2 * np.sum(p * labels) + 1) / (np.sum(p) + np.sum(labels) + 1)  # ContIG's DiceLoss(smooth=1)
    assert float(parts["bce"]) == pytest.approx(bce, rel=1e-5)
    assert float(parts["dice_loss"]) == pytest.approx(dice, rel=1e-5)
    assert float(loss) == pytest.approx(0.2 * bce + 0.8 * dice, rel=1e-5)


def test_per_class_dice_averages_each_structures_pooled_dice():
    """loss.dice="per_class": each channel's Dice pooled over batch and pixels, then the mean over channels."""
    rng = np.random.default_rng(3)
    logits = rng.normal(size=(2, 6, 6, 2)).astype(np.float32)
    labels = (rng.random((2, 6, 6, 2)) < np.array([0.05, 0.5])).astype(np.float32)  # a small and a large one
    loss, parts = pooled_bce_dice(jnp.asarray(logits), jnp.asarray(labels), dice="per_class")
    p = 1 / (1 + np.exp(-logits.astype(np.float64)))
    per = [1 - (2 * np.sum(p[..., c] * labels[..., c]) + 1) / (np.sum(p[..., c]) + np.sum(labels[..., c]) + 1)
           for c in range(2)]
    assert float(parts["dice_loss"]) == pytest.approx(np.mean(per), rel=1e-5)
    assert float(loss) == pytest.approx(0.2 * float(parts["bce"]) + 0.8 * np.mean(per), rel=1e-5)
    with pytest.raises(ValueError, match="loss.dice"):
        pooled_bce_dice(jnp.asarray(logits), jnp.asarray(labels), dice="weighted")
