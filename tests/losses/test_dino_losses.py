"""DINOv2 objectives against hand-computed values and a direct port of the PyTorch loops."""
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from medjax.losses import dino
from medjax.losses.dino import centered_teacher_probs, dino_loss, ibot_loss, update_center

# One compiled program per shape instead of op-by-op dispatch (CPU test time).
koleo_loss = jax.jit(dino.koleo_loss)
grouped_koleo_loss = jax.jit(dino.grouped_koleo_loss, static_argnums=1)
sinkhorn_knopp = jax.jit(dino.sinkhorn_knopp, static_argnames="num_iterations")


def log_softmax(x):
    x = x - x.max(-1, keepdims=True)
    return x - np.log(np.exp(x).sum(-1, keepdims=True))


def test_dino_loss_uniform_teacher_is_log_k():
    # Every student crop uniform over K = 4 prototypes and a uniform teacher: each pair costs log 4.
    student, teacher = np.zeros((3, 2, 4), np.float32), np.full((2, 2, 4), 0.25, np.float32)
    assert float(dino_loss(student, teacher, 0.1)) == pytest.approx(math.log(4), rel=1e-6)
    # The collapse diagnostics: uniform targets are at ln K per crop and over the batch; every crop on one prototype at
    # 0 and 0; each crop sharp on its own prototype at 0 per crop and ln K over the batch.
    np.testing.assert_allclose(dino.target_entropies(teacher), [math.log(4)] * 2, rtol=1e-6)
    np.testing.assert_allclose(dino.target_entropies(np.eye(4)[[1, 1, 1, 1]].reshape(2, 2, 4)), [0, 0], atol=1e-6)
    np.testing.assert_allclose(dino.target_entropies(np.eye(4).reshape(2, 2, 4)), [0, math.log(4)], atol=1e-6)


def test_dino_loss_matches_dinov2_pair_loops():
    rs = np.random.default_rng(0)
    s_crops, t_crops, batch, k = 5, 2, 3, 7
    student = rs.normal(size=(s_crops, batch, k)).astype(np.float32)
    teacher = np.exp(rs.normal(size=(t_crops, batch, k)))
    teacher = (teacher / teacher.sum(-1, keepdims=True)).astype(np.float32)
    tau = 0.1
    # dinov2 ssl_meta_arch: local crops vs both teacher crops, and the global crops vs the *other* teacher
    # crop (teacher chunks swapped) counted twice (loss_scales = 2); all over 2 + 2 * (S - 2) terms.
    local = sum(-(teacher[t] * log_softmax(student[s] / tau)).sum(-1).mean() for s in range(2, s_crops) for t in range(2))
    swapped = np.concatenate([teacher[1], teacher[0]])
    global_ = -(swapped * log_softmax(np.concatenate([student[0], student[1]]) / tau)).sum(-1).mean() * 2
    expected = (local + global_) / (2 + 2 * (s_crops - 2))
    assert float(dino_loss(student, teacher, tau)) == pytest.approx(expected, rel=1e-5)
    with pytest.raises(ValueError, match="dino_loss"):
        dino_loss(student[:1], teacher, tau)


def test_ibot_loss_weights_masked_tokens_per_image():
    # Image 0 has 2 masked tokens (weight 1/2 each), image 1 has 1 (weight 1), slot 3 is padding; 2 images.
    student = np.log(np.array([[0.5, 0.5], [0.25, 0.75], [0.9, 0.1], [0.3, 0.7]], np.float32)) * 0.1
    teacher = np.array([[1.0, 0.0], [0.0, 1.0], [1.0, 0.0], [0.5, 0.5]], np.float32)
    weights = np.array([0.5, 0.5, 1.0, 0.0], np.float32)
    # log_softmax(log(p)) = log(p): the cross-entropies are -log .5, -log .75, -log .9
    expected = (0.5 * -math.log(0.5) + 0.5 * -math.log(0.75) + 1.0 * -math.log(0.9)) / 2
    assert float(ibot_loss(student, teacher, weights, 2, 0.1)) == pytest.approx(expected, rel=1e-5)


def test_koleo_on_points_of_a_circle():
    x = np.array([[2.0, 0.0], [0.0, 3.0], [-1.0, 0.0]], np.float32)  # normalised: east, north, west
    # Nearest neighbours (largest dot, self excluded): east->north, north->east (tie, first), west->north;
    # every distance is sqrt(2).
    assert float(koleo_loss(x)) == pytest.approx(-math.log(math.sqrt(2)), abs=1e-6)
    x4 = np.array([[1.0, 0.0], [1.0, 1e-3], [-1.0, 0.0], [-1.0, -1e-3]], np.float32)
    d = np.linalg.norm(x4[0] - x4[1] / np.linalg.norm(x4[1]) + 1e-8)
    assert float(koleo_loss(x4)) == pytest.approx(-math.log(d + 1e-8), rel=1e-3)
    half = koleo_loss(jnp.asarray(x4, jnp.float16))  # computed in float32 whatever the input
    assert half.dtype == jnp.float32 and np.isfinite(float(half))
    # Groups of 2: each group is a close pair, the same value; one group of 4 gives the same here too.
    assert float(grouped_koleo_loss(x4, 2)) == pytest.approx(float(koleo_loss(x4)), rel=1e-4)
    with pytest.raises(ValueError, match="groups of 3"):
        grouped_koleo_loss(x4, 3)


def sinkhorn_torch_port(logits, temp, iters=3):
    q = np.exp(logits / temp).T
    b, k = q.shape[1], q.shape[0]
    q = q / q.sum()
    for _ in range(iters):
        q = q / q.sum(1, keepdims=True) / k
        q = q / q.sum(0, keepdims=True) / b
    return (q * b).T


def test_sinkhorn_knopp_hand_values_port_and_padding():
    # Equal logits: the uniform assignment 1/K.
    np.testing.assert_allclose(np.asarray(sinkhorn_knopp(np.zeros((3, 4), np.float32), 0.07)), 0.25, rtol=1e-6)
    # 2 samples, 2 prototypes, temperature 1: Q (prototypes x samples) = [[1, 2], [1, 1]] / 5. One
    # iteration by hand: prototype rows sum to [3/5, 2/5] -> [[1/3, 2/3], [1/2, 1/2]] / K = [[1/6, 1/3],
    # [1/4, 1/4]]; sample columns sum to [5/12, 7/12] -> sample 0: [2/5, 3/5], sample 1: [4/7, 3/7].
    logits = np.log(np.array([[1.0, 2.0], [1.0, 1.0]], np.float32)).T
    got = np.asarray(sinkhorn_knopp(logits, 1.0, num_iterations=1))
    np.testing.assert_allclose(got, [[2 / 5, 3 / 5], [4 / 7, 3 / 7]], rtol=1e-5)
    rs = np.random.default_rng(1)
    t = rs.normal(size=(6, 5)).astype(np.float32)
    q = np.asarray(sinkhorn_knopp(t, 0.5))
    np.testing.assert_allclose(q, sinkhorn_torch_port(t.astype(np.float64), 0.5), rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(q.sum(1), 1.0, rtol=1e-5)
    # Padding rows (valid False) change nothing for the valid rows and come back as zeros.
    padded = np.concatenate([t, rs.normal(size=(3, 5)).astype(np.float32) * 50])
    valid = np.arange(9) < 6
    qp = np.asarray(sinkhorn_knopp(padded, 0.5, valid=valid))
    np.testing.assert_allclose(qp[:6], q, rtol=1e-5, atol=1e-6)
    np.testing.assert_array_equal(qp[6:], 0.0)
    assert np.isfinite(np.asarray(sinkhorn_knopp(padded, 0.5, valid=np.zeros(9, bool)))).all()


def test_centering_and_center_update():
    probs = np.asarray(centered_teacher_probs(np.array([[1.0, 2.0]]), np.array([[0.0, 1.0]]), 0.5))
    np.testing.assert_allclose(probs, [[0.5, 0.5]], rtol=1e-6)  # centred logits are equal
    probs = np.asarray(centered_teacher_probs(np.array([[math.log(3.0) * 0.1, 0.0]]), np.zeros((1, 2)), 0.1))
    np.testing.assert_allclose(probs, [[0.75, 0.25]], rtol=1e-5)
    center = update_center(jnp.array([[1.0, -1.0]]), jnp.array([[3.0, 1.0]]), 0.9)
    np.testing.assert_allclose(np.asarray(center), [[1.2, -0.8]], rtol=1e-6)
