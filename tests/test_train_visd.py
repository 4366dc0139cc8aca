"""ViSD-Boost's three stages end to end on the ct_reports test demo, each initialised from the previous one's
workdir (tiny variants, 2 steps each): stage 1 moves the momentum encoder and the BN statistics and leaves the
text tower and the VQ-VAE alone; stage 2 trains only the VQ-VAE and its EMA codebook; stage 3 keeps the
normality model frozen, clamps the temperature, and the CT-RATE zero-shot evaluation fills the table. Also the
vision-semantic targets and loss against a numpy implementation."""
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from medjax import config as config_lib
from medjax.losses.vision_semantic import vision_semantic_loss, vision_semantic_targets
from medjax.tasks import build_task
from medjax.tasks.visd import ViSDTask
from medjax.trainer import Trainer

QUIET = dict(log=lambda *_: None)
STAGES = ("visd_stage1_vse", "visd_stage2_vqvae", "visd_stage3_vlp")


def _flat(tree) -> dict:
    return {"/".join(str(getattr(p, "key", p)) for p in path): np.asarray(leaf)
            for path, leaf in jax.tree_util.tree_flatten_with_path(nn.unbox(tree))[0]}


@pytest.fixture(scope="module")
def runs(demo_roots, tmp_path_factory):
    """{exp: (task, result, initial params, trained params)}, each stage from the previous one's workdir."""
    demo, out, previous = demo_roots("ct_reports"), {}, ""
    for exp in STAGES:
        workdir = str(tmp_path_factory.mktemp(exp))
        overrides = [f"data.dir={demo}", "mesh.num_devices=1", "loss.max_temperature=0.0705"]
        config = config_lib.get_config(exp, "tiny", overrides + ([f"init={previous}"] if previous else []))
        task = build_task(config, **QUIET)
        trainer = Trainer(config, task, workdir)
        start = _flat(out[STAGES[STAGES.index(exp) - 1]][3]) if previous else _flat(jax.device_get(trainer.state["params"]))
        result = trainer.run()
        out[exp] = (task, result, start, jax.device_get(trainer.state["params"]))
        previous = workdir
    return out


def test_stage1_vision_semantic_enhancement(runs):
    task, result, init, params = runs["visd_stage1_vse"]
    assert isinstance(task, ViSDTask) and task.stage == "vse"
    assert result["step"] == 2 and np.isfinite(result["losses"]).all() and result["losses"][0] > 0
    batch = next(iter(task.train_data()))
    assert batch["volumes_b"].shape == batch["volumes"].shape == (8, 16, 32, 32, 1)
    now = _flat(params)
    moved = lambda prefix: any(not np.allclose(now[k], init[k]) for k in now if k.startswith(prefix))  # noqa: E731
    assert moved("model/vision/res_model") and moved("batch_stats/") and moved("momentum/params/")
    assert not moved("model/text") and not moved("model/vision/vqvae") and not moved("codebook/")
    # momentum = EMA of the online weights: between its init and the online weights
    k = "model/vision/pooling/vision_projs_kernel"
    m = now["momentum/params/pooling/vision_projs_kernel"]
    np.testing.assert_allclose(m, init[k], atol=np.abs(now[k] - init[k]).max() * 0.02 + 1e-7)


def test_stage2_trains_only_the_normality_model(runs):
    _, result, start, params = runs["visd_stage2_vqvae"]
    assert np.isfinite(result["losses"]).all()
    now = _flat(params)
    assert "momentum/params/pooling/query_tokens" not in now  # no momentum encoder after stage 1
    for key, value in now.items():
        if key.startswith("model/vision/vqvae/") or key.startswith("codebook/"):
            continue
        np.testing.assert_array_equal(value, start[key], err_msg=key)  # backbone, BN statistics, pooling, text
    assert float(now["codebook/vision/vqvae/vq_layer/count"]) == 2.0
    assert not np.allclose(now["codebook/vision/vqvae/vq_layer/embeddings"],
                           start["codebook/vision/vqvae/vq_layer/embeddings"])


def test_stage3_contrast_keeps_the_vqvae_and_evaluates(runs):
    task, result, start, params = runs["visd_stage3_vlp"]
    assert np.isfinite(result["losses"]).all() and result["losses"][0] > 1.0
    now = _flat(params)
    for key in now:
        if key.startswith("model/vision/vqvae/") or key.startswith("codebook/"):
            np.testing.assert_array_equal(now[key], start[key], err_msg=key)
    assert not np.allclose(now["model/text_proj/kernel"], start["model/text_proj/kernel"])
    assert float(now["model/temp"]) <= 0.0705 + 1e-7  # clamped after each step
    results = task.evaluate(params)
    assert results["labels_evaluated"] >= 1 and 0.0 <= results["auc"] <= 1.0
    table = task.results_table("visd_ctrate", [("tiny", results)])
    assert "| fVLM (paper) |" in table and "| ViSD-Boost (paper) |" in table and "| medjax visd_ctrate tiny |" in table


def _numpy_vse(q_a, q_b, k_a, k_b, normal, valid, temp):
    total = 0.0
    for o in range(normal.shape[0]):
        idx = np.flatnonzero(valid[o])
        n = normal[o, idx]
        if len(idx) < 2 or n.all():
            continue  # no abnormal sample (or nothing to contrast): skipped
        targets = (n[:, None] & n[None, :]) | np.eye(len(idx), dtype=bool)
        targets = targets / targets.sum(1, keepdims=True)

        def ce(logits):
            logits = logits - logits.max(1, keepdims=True)
            logp = logits - np.log(np.exp(logits).sum(1, keepdims=True))
            return -(targets * logp).sum(1).mean()

        def sym(q, k):
            s = q[o, idx] @ k[o, idx].T / temp
            return 0.5 * (ce(s) + ce(s.T))

        total += 0.5 * (sym(q_a, k_b) + sym(q_b, k_a))
    return total


def test_vision_semantic_targets_and_loss_equal_numpy():
    normal = np.asarray([[True, True, False, True, False]])
    valid = np.asarray([[True, True, True, False, True]])
    targets = np.asarray(vision_semantic_targets(jnp.asarray(normal), jnp.asarray(valid)))[0]
    want = np.zeros((5, 5))
    want[0, [0, 1]] = want[1, [0, 1]] = 0.5  # normal-normal positives
    want[2, 2] = want[4, 4] = 1.0  # an abnormal organ: only its own view
    np.testing.assert_allclose(targets, want)
    rng = np.random.default_rng(0)
    unit = lambda x: x / np.linalg.norm(x, axis=-1, keepdims=True)  # noqa: E731
    q_a, q_b, k_a, k_b = (unit(rng.normal(size=(3, 6, 4))).astype(np.float32) for _ in range(4))
    normal = rng.random((3, 6)) < 0.5
    normal[2] = True  # an all-normal organ: skipped
    valid = rng.random((3, 6)) < 0.8
    # one jit for the value and the gradient wrt the momentum view (eager ops would compile one by one)
    value_and_grad = jax.jit(jax.value_and_grad(
        lambda k, q_a, q_b, k_b, normal, valid: vision_semantic_loss(q_a, q_b, k, k_b, normal, valid, 0.1)))
    got, grad = value_and_grad(*(jnp.asarray(x) for x in (k_a, q_a, q_b, k_b, normal, valid)))
    np.testing.assert_allclose(float(got), _numpy_vse(q_a, q_b, k_a, k_b, normal, valid, 0.1), rtol=1e-5)
    np.testing.assert_array_equal(np.asarray(grad), 0.0)  # no gradient into the momentum encoder
