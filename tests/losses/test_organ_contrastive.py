"""fVLM's organ-level soft-target contrast equals a direct torch restatement of the reference loop
(`BlipPretrain.forward` of alibaba-damo-academy/fvlm: per organ, gather the intact samples, build
S = I + B from the normal flags and the texts, skip by its two rules, sum over organs), in value and in
gradient (embeddings and temperature), on random inputs that exercise every skip rule."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
import torch.nn.functional as F

from medjax.losses.organ_contrastive import (fvlm_organ_loss, organ_losses, organ_soft_targets,
                                             organ_target_entropy)


def _torch_reference(image, text, normal, text_ids, intact, temp):
    """The reference's loop on one process, texts replaced by their ids (equal id = identical text)."""
    total, taken = torch.zeros(()), []
    for organ in range(image.shape[0]):
        if not (intact[organ] & ~normal[organ]).any():  # organ_status_world == 0
            continue
        rows = np.where(intact[organ])[0]
        if not len(rows):
            continue
        v, t = image[organ, rows], text[organ, rows]
        sim_i2t = v @ t.t() / temp
        sim_t2i = t @ v.t() / temp
        with torch.no_grad():
            targets = torch.zeros(sim_i2t.size())
            targets.fill_diagonal_(1)
            flag = normal[organ, rows]
            ids = text_ids[organ, rows]
            semantic = (flag[:, None] * flag[None, :]).astype(float) + (ids[:, None] == ids[None, :]).astype(float)
            semantic = torch.from_numpy(semantic.astype(bool))
            semantic.fill_diagonal_(0)
            targets += semantic
            targets /= targets.sum(1, keepdim=True)
        if len(torch.unique(targets)) == 1:
            continue
        loss_i2t = -torch.sum(F.log_softmax(sim_i2t, dim=1) * targets, dim=1).mean()
        loss_t2i = -torch.sum(F.log_softmax(sim_t2i, dim=1) * targets, dim=1).mean()
        total = total + (loss_i2t + loss_t2i) / 2
        taken.append(organ)
    return total, taken


def _random_case(seed, organs=7, batch=6, dim=8):
    rng = np.random.default_rng(seed)
    image = rng.normal(size=(organs, batch, dim))
    text = rng.normal(size=(organs, batch, dim))
    image /= np.linalg.norm(image, axis=-1, keepdims=True)
    text /= np.linalg.norm(text, axis=-1, keepdims=True)
    normal = rng.random((organs, batch)) < 0.5
    # Normal texts share one id (the template sentence); abnormal texts draw from a few ids.
    text_ids = np.where(normal, 0, rng.integers(1, 4, size=(organs, batch)))
    intact = rng.random((organs, batch)) < 0.75
    # Force every skip rule: organ 1 all normal, organ 2 one intact sample, organ 3 one shared abnormal text.
    normal[1] = True
    text_ids[1] = 0
    intact[2] = False
    intact[2, 0], normal[2, 0], text_ids[2, 0] = True, False, 5
    normal[3], text_ids[3] = False, 7
    return image.astype(np.float32), text.astype(np.float32), normal, text_ids, intact


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_value_and_gradient_equal_the_reference(seed):
    image, text, normal, text_ids, intact = _random_case(seed)
    # Organ 0 must take part: one abnormal intact sample and some normal ones.
    intact[0, :3], normal[0, :3], text_ids[0, :3] = True, [False, True, True], [3, 0, 0]
    temp = 0.07
    image_t = torch.tensor(image, dtype=torch.float64, requires_grad=True)
    text_t = torch.tensor(text, dtype=torch.float64, requires_grad=True)
    temp_t = torch.tensor(temp, dtype=torch.float64, requires_grad=True)
    expected, reference_taken = _torch_reference(image_t, text_t, normal, text_ids, intact, temp_t)
    expected.backward()
    expected = expected.item()

    loss_fn = jax.jit(jax.value_and_grad(fvlm_organ_loss, argnums=(0, 1, 5)))
    value, (g_image, g_text, g_temp) = loss_fn(image, text, normal, text_ids, intact, jnp.float32(temp))
    assert expected > 0.1 and reference_taken[0] == 0 and len(reference_taken) >= 2  # organ 0 and random ones
    np.testing.assert_allclose(float(value), expected, rtol=2e-5)
    np.testing.assert_allclose(np.asarray(g_image), image_t.grad.numpy(), rtol=1e-4, atol=1e-5)
    np.testing.assert_allclose(np.asarray(g_text), text_t.grad.numpy(), rtol=1e-4, atol=1e-5)
    np.testing.assert_allclose(float(g_temp), float(temp_t.grad), rtol=1e-4)
    _, taken = organ_losses(image, text, normal, text_ids, intact, temp)
    assert np.flatnonzero(np.asarray(taken)).tolist() == reference_taken
    assert not any(organ in reference_taken for organ in (1, 2, 3))  # the three forced skips
    # Skipped organs and non-intact samples get no gradient.
    assert not np.any(np.asarray(g_image)[1:4]) and not np.any(np.asarray(g_image)[0][~intact[0]])


def test_soft_targets_from_flags_and_text_ids():
    normal = np.array([[True, True, False, False, True]])
    text_ids = np.array([[0, 0, 4, 4, 0]])
    intact = np.array([[True, True, True, True, False]])
    targets = np.asarray(organ_soft_targets(normal, text_ids, intact))[0]
    half = 0.5
    expected = np.array([[half, half, 0, 0, 0],  # both normal
                         [half, half, 0, 0, 0],
                         [0, 0, half, half, 0],  # same abnormal text
                         [0, 0, half, half, 0],
                         [0, 0, 0, 0, 0]])  # not intact: no row, no column
    np.testing.assert_array_equal(targets, expected)


def test_target_entropy_is_the_floor_of_the_loss():
    # The rows of test_soft_targets_from_flags_and_text_ids: four intact rows of entropy ln 2 each, a not-intact
    # row left out; an organ that is not taken adds nothing.
    normal = np.array([[True, True, False, False, True]] * 2)
    text_ids = np.array([[0, 0, 4, 4, 0]] * 2)
    intact = np.array([[True, True, True, True, False]] * 2)
    floor = float(organ_target_entropy(normal, text_ids, intact, np.array([True, False])))
    np.testing.assert_allclose(floor, np.log(2.0), rtol=1e-6)
    # The loss reaches it with similarities that are log S (up to a constant) both ways, and is above it otherwise.
    emb = np.array([[1.0, 0.0], [1.0, 0.0], [0.0, 1.0], [0.0, 1.0], [0.6, 0.8]], np.float32)[None].repeat(2, 0)
    near = float(jnp.sum(organ_losses(emb, emb, normal, text_ids, intact, 1e-3)[0][:1]))
    np.testing.assert_allclose(near, floor, rtol=1e-4)
    image, text, normal, text_ids, intact = _random_case(0)
    losses, taken = organ_losses(image, text, normal, text_ids, intact, 0.07)
    assert float(jnp.sum(losses)) >= float(organ_target_entropy(normal, text_ids, intact, taken)) - 1e-5


def test_hand_computed_two_sample_organ():
    # One organ, two intact samples, one abnormal: S = I; orthogonal embeddings -> logits diag 1/temp.
    image = np.array([[[1.0, 0.0], [0.0, 1.0]]], np.float32)
    text = image.copy()
    temp = 0.5
    loss = float(fvlm_organ_loss(image, text, np.array([[False, True]]), np.array([[1, 0]]),
                                 np.array([[True, True]]), temp))
    expected = np.log1p(np.exp(-1 / temp))  # -log(e^2 / (e^2 + e^0)), the same both ways and both rows
    np.testing.assert_allclose(loss, expected, rtol=1e-6)


def test_shape_mismatch_is_named():
    image = np.zeros((4, 2, 8), np.float32)
    with pytest.raises(ValueError, match="intact must be \\(organs, batch\\)"):
        fvlm_organ_loss(image, image, np.zeros((4, 2), bool), np.zeros((4, 2), int), np.zeros((3, 2), bool), 0.07)
