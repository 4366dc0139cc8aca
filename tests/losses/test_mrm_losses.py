"""MRM losses (Sec. 3.2.2-3.2.4) against hand-written numpy on tiny tensors (B = 3)."""
import jax
import numpy as np
import pytest

from medjax.losses.reconstruction import genome_mse, masked_image_mse
from medjax.losses.relation_matching import (cosine_similarity_matrix, cross_relation_matching,
                                             self_relation_matching)
from medjax.losses.mrm import mrm_loss


def numpy_cosine(a, b):
    out = np.zeros((len(a), len(b)))
    for i in range(len(a)):
        for j in range(len(b)):
            out[i, j] = a[i] @ b[j] / (np.linalg.norm(a[i]) * np.linalg.norm(b[j]))
    return out


def pooled(seed, batch=3, dim=5):
    rs = np.random.default_rng(seed)
    return [rs.normal(size=(batch, dim)).astype(np.float32) for _ in range(4)]


def test_cosine_similarity_matrix():
    a, b, _, _ = pooled(0)
    np.testing.assert_allclose(np.asarray(cosine_similarity_matrix(a, b[:2])), numpy_cosine(a, b[:2]), rtol=1e-5)


def test_self_relation_matching_sums_over_pairs():
    z_i, z_i_m, z_g, z_g_m = pooled(1)
    total = 0.0
    for i in range(3):
        for j in range(3):
            total += (numpy_cosine(z_i, z_i)[i, j] - numpy_cosine(z_i_m, z_i_m)[i, j]) ** 2
            total += (numpy_cosine(z_g, z_g)[i, j] - numpy_cosine(z_g_m, z_g_m)[i, j]) ** 2
    got = self_relation_matching(z_i, z_i_m, z_g, z_g_m)
    np.testing.assert_allclose(float(got), total / (2 * 3 ** 2), rtol=1e-5)


def test_cross_relation_matching_uses_sample_j_for_the_genome():
    z_i, z_g, z_i_m, z_g_m = pooled(2)
    total = 0.0
    for i in range(3):
        for j in range(3):
            r_ig = z_i[i] @ z_g[j] / (np.linalg.norm(z_i[i]) * np.linalg.norm(z_g[j]))
            r_ig_m = z_i_m[i] @ z_g_m[j] / (np.linalg.norm(z_i_m[i]) * np.linalg.norm(z_g_m[j]))
            total += (r_ig - r_ig_m) ** 2
    got = cross_relation_matching(z_i, z_g, z_i_m, z_g_m)
    np.testing.assert_allclose(float(got), total / 3 ** 2, rtol=1e-5)


def test_centered_cosine_matching_against_numpy():
    """"centered_cosine": every feature matrix centred over the batch (per dimension, each modality on its own)
    before the cosine; L_self and L_cross otherwise as the paper's sums."""
    z_i, z_i_m, z_g, z_g_m = pooled(6, batch=4)
    c = lambda x: x - x.mean(axis=0)  # noqa: E731
    want_self = (np.sum((numpy_cosine(c(z_i), c(z_i)) - numpy_cosine(c(z_i_m), c(z_i_m))) ** 2)
                 + np.sum((numpy_cosine(c(z_g), c(z_g)) - numpy_cosine(c(z_g_m), c(z_g_m))) ** 2)) / (2 * 4 ** 2)
    want_cross = np.sum((numpy_cosine(c(z_i), c(z_g)) - numpy_cosine(c(z_i_m), c(z_g_m))) ** 2) / 4 ** 2
    got_self = self_relation_matching(z_i, z_i_m, z_g, z_g_m, similarity="centered_cosine")
    got_cross = cross_relation_matching(z_i, z_g, z_i_m, z_g_m, similarity="centered_cosine")
    np.testing.assert_allclose([float(got_self), float(got_cross)], [want_self, want_cross], rtol=1e-5)
    with pytest.raises(ValueError, match="relation_similarity"):
        self_relation_matching(z_i, z_i_m, z_g, z_g_m, similarity="pearson")


def test_centering_removes_the_shared_direction_that_flattens_plain_cosines():
    """Pooled features = one large shared vector + small per-sample parts (what the demo's pooled features look
    like: plain cosines ~0.98): the plain relations are ~all-ones and the terms vanish, the centred ones see
    the per-sample parts, and a shift shared by the batch does not change them."""
    rs = np.random.default_rng(7)
    shared = 20.0 * rs.normal(size=(1, 8))
    parts = [rs.normal(size=(6, 8)) for _ in range(4)]
    z_i, z_i_m, z_g, z_g_m = [(shared + p).astype(np.float32) for p in parts]
    plain = float(self_relation_matching(z_i, z_i_m, z_g, z_g_m))
    centred = float(self_relation_matching(z_i, z_i_m, z_g, z_g_m, similarity="centered_cosine"))
    assert plain < 1e-3 < 0.1 < centred
    moved = [(p + 5.0).astype(np.float32) for p in (z_i, z_i_m, z_g, z_g_m)]
    assert float(self_relation_matching(*moved, similarity="centered_cosine")) == pytest.approx(centred, rel=1e-4)


def test_matching_is_zero_when_masked_features_equal_complete_ones_up_to_scale():
    z_i, z_g, _, _ = pooled(3)
    assert float(self_relation_matching(z_i, 2.0 * z_i, z_g, 0.5 * z_g)) == pytest.approx(0.0, abs=1e-7)
    assert float(cross_relation_matching(z_i, z_g, 3.0 * z_i, z_g)) == pytest.approx(0.0, abs=1e-7)


def test_cross_relation_matching_rejects_mismatched_dims():
    z_i, z_g, z_i_m, z_g_m = pooled(4)
    with pytest.raises(ValueError, match="relation_matching.py"):
        cross_relation_matching(z_i, z_g[:, :3], z_i_m, z_g_m[:, :3])


def numpy_patchify(images, p):
    """MAE's torch patchify on NCHW: 'nchpwq->nhwpqc'."""
    x = np.transpose(images, (0, 3, 1, 2))
    n, c, h, w = x.shape
    x = x.reshape(n, c, h // p, p, w // p, p)
    return np.einsum("nchpwq->nhwpqc", x).reshape(n, (h // p) * (w // p), p * p * c)


@pytest.mark.parametrize("norm_pix_loss", [False, True])
def test_masked_image_mse(norm_pix_loss):
    rs = np.random.default_rng(5)
    images = rs.normal(size=(3, 4, 6, 3)).astype(np.float32)
    pred = rs.normal(size=(3, 6, 12)).astype(np.float32)
    target = numpy_patchify(images, 2).astype(np.float64)
    if norm_pix_loss:
        target = (target - target.mean(-1, keepdims=True)) / np.sqrt(target.var(-1, ddof=1, keepdims=True) + 1e-6)
    expected = np.mean((pred - target) ** 2)
    got = masked_image_mse(pred, images, 2, norm_pix_loss=norm_pix_loss)
    np.testing.assert_allclose(float(got), expected, rtol=1e-5)


def test_masked_image_mse_patch_mask_averages_over_masked_patches():
    rs = np.random.default_rng(6)
    images = rs.normal(size=(3, 4, 4, 3)).astype(np.float32)
    pred = rs.normal(size=(3, 4, 12)).astype(np.float32)
    mask = np.array([[1, 0, 0, 1], [0, 0, 0, 1], [1, 1, 1, 1]], np.float32)
    per_patch = np.mean((pred - numpy_patchify(images, 2)) ** 2, axis=-1)
    got = masked_image_mse(pred, images, 2, norm_pix_loss=False, patch_mask=mask)
    np.testing.assert_allclose(float(got), (per_patch * mask).sum() / mask.sum(), rtol=1e-5)


def test_masked_image_mse_rejects_wrong_pred_shape():
    with pytest.raises(ValueError, match="reconstruction.py masked_image_mse"):
        masked_image_mse(np.zeros((3, 4, 11), np.float32), np.zeros((3, 4, 4, 3), np.float32), 2, norm_pix_loss=False)


def test_genome_mse():
    rs = np.random.default_rng(7)
    pred, genome = rs.normal(size=(3, 10)), rs.integers(0, 3, size=(3, 10)).astype(np.float32)
    got = genome_mse(pred.astype(np.float32), genome)
    np.testing.assert_allclose(float(got), np.mean((pred.astype(np.float32) - genome) ** 2), rtol=1e-5)


def test_mrm_loss_combines_the_parts_with_lambda():
    rs = np.random.default_rng(8)
    images = rs.normal(size=(3, 4, 4, 3)).astype(np.float32)
    genome = rs.integers(0, 3, size=(3, 7)).astype(np.float32)
    z_i, z_i_m, z_g, z_g_m = pooled(9)
    outputs = {"image_pred": rs.normal(size=(3, 4, 12)).astype(np.float32),
               "genome_pred": rs.normal(size=(3, 7)).astype(np.float32),
               "image_pooled": z_i, "image_masked_pooled": z_i_m, "genome_pooled": z_g, "genome_masked_pooled": z_g_m}
    loss, parts = jax.jit(lambda o: mrm_loss(o, images, genome, patch_size=2, lam=0.3, norm_pix_loss=False))(outputs)
    recon_image = np.mean((outputs["image_pred"] - numpy_patchify(images, 2)) ** 2)
    recon_genome = np.mean((outputs["genome_pred"] - genome) ** 2)
    self_m = (np.sum((numpy_cosine(z_i, z_i) - numpy_cosine(z_i_m, z_i_m)) ** 2)
              + np.sum((numpy_cosine(z_g, z_g) - numpy_cosine(z_g_m, z_g_m)) ** 2)) / 18
    cross_m = np.sum((numpy_cosine(z_i, z_g) - numpy_cosine(z_i_m, z_g_m)) ** 2) / 9
    for name, value in [("recon_image", recon_image), ("recon_genome", recon_genome),
                        ("self_matching", self_m), ("cross_matching", cross_m)]:
        np.testing.assert_allclose(float(parts[name]), value, rtol=1e-5, err_msg=name)
    np.testing.assert_allclose(float(loss), recon_image + recon_genome + 0.3 * (self_m + cross_m), rtol=1e-5)
