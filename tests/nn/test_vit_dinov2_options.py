"""ViT options for DINOv2: bicubic position-embedding resize (vs torch), registers, mask token, features."""
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
import torch.nn.functional as F

from medjax.nn.vit import ViTEncoder, patchify, position_resize_matrix


@pytest.mark.parametrize("size_in,size_out,offset,antialias", [
    (14, 6, 0.1, False), (14, 6, 0.0, False), (14, 6, 0.1, True), (14, 6, 0.0, True), (4, 7, 0.1, False),
    (14, 16, 0.1, False), (5, 3, 0.0, True)])
def test_position_resize_matches_torch_interpolate(size_in, size_out, offset, antialias):
    grid = np.random.default_rng(size_in * 31 + size_out).normal(size=(size_in, size_in))
    x = torch.tensor(grid)[None, None]
    if offset:  # DINOv2 interpolate_pos_encoding: scale_factor (out + offset) / in
        scale = (size_out + offset) / size_in
        expected = F.interpolate(x, scale_factor=(scale, scale), mode="bicubic", antialias=antialias)
    else:
        expected = F.interpolate(x, size=(size_out, size_out), mode="bicubic", antialias=antialias)
    m = position_resize_matrix(size_in, size_out, offset=offset, antialias=antialias)
    np.testing.assert_allclose(m @ grid @ m.T, expected[0, 0].numpy(), rtol=1e-10, atol=1e-10)


def test_offset_quirk_differs_from_a_plain_resize():
    with_offset = position_resize_matrix(14, 6, offset=0.1)
    plain = position_resize_matrix(14, 6)
    assert np.abs(with_offset - plain).max() > 1e-3
    np.testing.assert_allclose(with_offset.sum(1), 1.0, rtol=1e-12)  # still an interpolation


def fill(abstract, seed):
    rs = np.random.default_rng(seed)
    return jax.tree.map(lambda s: jnp.asarray(rs.normal(0, 0.5, s.shape), s.dtype), abstract)


def test_registers_mask_token_and_resized_positions():
    enc = ViTEncoder(image_size=16, patch_size=4, width=8, depth=1, num_heads=2, num_register_tokens=2,
                     use_mask_token=True, dynamic_image_size=True, drop_path=0.2, drop_path_uniform=True)
    images = np.random.default_rng(0).normal(size=(2, 8, 12, 3)).astype(np.float32)  # a 2 x 3 grid
    masks = np.array([[True, False, False, False, True, False], [False] * 6])
    variables = fill(jax.eval_shape(lambda: enc.init(jax.random.key(0), images, masks)), 1)
    p = jax.tree.map(np.asarray, nn.unbox(variables["params"]))
    assert p["register_tokens"].shape == (1, 2, 8) and p["mask_token"].shape == (1, 8)
    specs = nn.get_partition_spec(variables)["params"]
    assert tuple(specs["mask_token"]) == (None, "embed") and tuple(specs["register_tokens"]) == (None, None, "embed")

    run = jax.jit(lambda v, x, m: (enc.apply(v, x, m, method=ViTEncoder.embed),
                                   enc.apply(v, x, m, method=ViTEncoder.features), enc.apply(v, x, m)))
    z0, out, tokens = run(variables, images, masks)  # one compile instead of op-by-op dispatch
    z0 = np.asarray(z0)
    proj = p["patch_embed"]["proj"]
    patches = np.asarray(patchify(images, 4)) @ proj["kernel"].reshape(48, 8) + proj["bias"]
    patches = np.where(masks[..., None], p["mask_token"][None], patches)
    grid = p["pos_embed"][0, 1:].reshape(4, 4, 8)
    rows, cols = position_resize_matrix(4, 2, offset=0.1), position_resize_matrix(4, 3, offset=0.1)
    positions = np.einsum("ri,ijd,cj->rcd", rows, grid, cols).reshape(6, 8)
    cls = p["cls_token"][0] + p["pos_embed"][0, :1]
    expected = np.concatenate([np.broadcast_to(cls, (2, 1, 8)), np.broadcast_to(p["register_tokens"], (2, 2, 8)),
                               patches + positions], axis=1)  # [cls, registers, patches]; registers get no position
    np.testing.assert_allclose(z0, expected, rtol=1e-5, atol=1e-5)

    assert out["cls_token"].shape == (2, 8) and out["register_tokens"].shape == (2, 2, 8)
    np.testing.assert_array_equal(np.asarray(out["patch_tokens"]), np.asarray(tokens[:, 3:]))
    np.testing.assert_array_equal(np.asarray(out["cls_token"]), np.asarray(tokens[:, 0]))
    assert [b.drop_path for b in enc.bind(variables).blocks] == [0.2]  # uniform: the rate in every block
    with pytest.raises(ValueError, match="use_mask_token"):
        ViTEncoder(image_size=8, patch_size=4, width=8, depth=0, num_heads=2).init(
            jax.random.key(0), np.zeros((2, 8, 8, 3), np.float32), np.zeros((2, 4), bool))
    with pytest.raises(ValueError, match="multiple of patch_size"):
        jax.eval_shape(lambda v: enc.apply(v, images[:, :6]), variables)


def test_square_training_size_uses_the_stored_positions():
    enc = ViTEncoder(image_size=8, patch_size=4, width=8, depth=0, num_heads=2, dynamic_image_size=True)
    variables = fill(jax.eval_shape(lambda: enc.init(jax.random.key(0), jnp.zeros((1, 8, 8, 3)))), 2)
    stored = enc.apply(variables, (2, 2), method=ViTEncoder.position_embedding)
    np.testing.assert_array_equal(np.asarray(stored), np.asarray(variables["params"]["pos_embed"].value))
