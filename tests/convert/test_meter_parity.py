"""METER checkpoint -> PTUnifier params (`python -m medjax.convert meter CKPT --out DIR`) and `--set init=DIR` into
the PTUnifier pretraining task: a PyTorch restatement of the released `METERTransformerSS` with METER's module
names (medjax/convert/torch_ptunifier.py, so its state_dict has METER's keys; random weights, a VQAv2 head as a
fine-tuned METER holds) at the tiny PTUnifier size is saved as a Lightning checkpoint, converted by the CLI,
loaded by the task's `load_pretrained` (the trainer's init path), and compared with METER's forward (image +
text features, pooled features, MLM and ITM logits) within 1e-4. What METER lacks (ITC head, prompt pools)
keeps the task's initialisation; a Swin METER is refused by name."""
import contextlib
import io
import os

import jax
import numpy as np
import pytest
import torch

from medjax import config as config_lib
from medjax.checkpoint import restore_params
from medjax.convert import meter
from medjax.convert.__main__ import main as convert_main
from medjax.tasks import build_task
from medjax.convert.torch_ptunifier import Dims, TorchMETER
from tests.models.random_params import random_params

TOL = 1e-4
FRESH = ("itc_image_norm", "itc_text_norm", "itc_image_proj", "itc_text_proj", "visual_prompts", "textual_prompts")


@pytest.fixture(scope="module")
def converted(tmp_path_factory, demo_roots):
    """(task, torch METER, fresh task params, params after init= the converted METER, the CLI's output)."""
    tmp, demo = tmp_path_factory.mktemp("meter"), demo_roots("image_report")
    # the tiny PTUnifier (width 32, 2 heads, 1 CLIP block, 1 text layer) with CLIP's 4x FFN
    config = config_lib.get_config("ptunifier", "tiny", [f"data.dir={demo}", "model.vision_mlp_dim=128"])
    task = build_task(config, log=lambda *_: None)
    m = task.model_cfg
    dims = Dims(width=m.vision_width, heads=m.vision_heads, mlp=m.text_mlp_dim, vocab=m.vocab_size, patch=m.patch_size,
                image=m.image_size, clip_layers=m.vision_depth + 1, text_layers=m.text_depth, fusion=m.fusion_layers,
                text_positions=m.max_positions)
    torch.manual_seed(0)
    model = TorchMETER(dims, vqa_answers=5).eval()
    ckpt = str(tmp / "meter.ckpt")
    torch.save({"state_dict": model.state_dict(), "epoch": 9}, ckpt)
    out = str(tmp / "params")
    printed = io.StringIO()
    with contextlib.redirect_stdout(printed):
        assert convert_main(["meter", ckpt, "--out", out, "--heads", str(m.vision_heads)]) == 0
    fresh = random_params(jax.eval_shape(task.init_params, jax.random.PRNGKey(0)))  # stands in for the init
    merged = task.load_pretrained(fresh, restore_params(out))  # what the trainer does with --set init=out
    return task, model, fresh, merged, printed.getvalue(), restore_params(out)


def test_cli_writes_what_meter_has_and_names_the_rest(converted):
    _, _, _, _, printed, written = converted
    assert "not in the checkpoint, left to the model's initialisation" in printed
    for key in ("itc_head.vision_proj.weight", "pseudo_vision_token_pool", "pseudo_language_token_pool"):
        assert key in printed
    assert "vqa_classifier.3.weight" in printed and "language_encoder.pooler.dense.weight" in printed  # ignored
    assert not set(FRESH) & set(written) and {"vision", "text", "fusion_0", "mlm_decoder", "itm_head"} <= set(written)


def test_init_from_meter_matches_meters_forward(converted):
    task, model, fresh, merged, _, _ = converted
    for name in FRESH:  # PTUnifier's own parts keep the task's initialisation
        for a, b in zip(jax.tree.leaves(merged[name]), jax.tree.leaves(fresh[name]), strict=True):
            np.testing.assert_array_equal(a, b)
    m = task.model_cfg
    rng = np.random.default_rng(0)
    images = rng.normal(size=(2, m.image_size, m.image_size, 3)).astype(np.float32)
    ids = rng.integers(5, m.vocab_size, size=(2, 9))
    ids[:, 0], mask = 0, np.ones_like(ids)
    ids[0, 8], ids[1, 5], ids[1, 6:], mask[1, 6:] = 2, 2, 1, 0  # </s>, padding

    def run(module, images, ids, mask):
        out = module.infer(images, ids, mask)
        return out, module.mlm_logits(out["text_feats"]), module.itm_logits(out["cls_feats"])

    ours, mlm, itm = jax.device_get(jax.jit(lambda p: task.model.apply({"params": p}, images, ids, mask, method=run))(
        merged))
    with torch.no_grad():
        x, y, cls = model.infer(torch.from_numpy(images.transpose(0, 3, 1, 2)), torch.from_numpy(ids),
                                torch.from_numpy(mask))
        want = {"text_feats": x, "image_feats": y, "cls_feats": cls, "mlm": model.mlm_score(x),
                "itm": model.itm_score.fc(cls)}
    for key, got in (("text_feats", ours["text_feats"]), ("image_feats", ours["image_feats"]),
                     ("cls_feats", ours["cls_feats"]), ("mlm", mlm), ("itm", itm)):
        np.testing.assert_allclose(np.asarray(got), want[key].numpy(), atol=TOL, rtol=0, err_msg=key)


def test_meter_problems_are_named(tmp_path):
    swin = {"vit_model.patch_embed.proj.weight": np.zeros((4, 3, 4, 4), np.float32),
            "text_transformer.embeddings.word_embeddings.weight": np.zeros((10, 4), np.float32)}
    with pytest.raises(ValueError, match="swin.ckpt: key 'vit_model.visual.conv1.weight' is missing "
                                         r"\(a Swin-backbone METER checkpoint\)"):
        meter.ptunifier_state_from_meter(swin, "swin.ckpt")
    renamed = meter.ptunifier_state_from_meter({"vit_model.visual.conv1.weight": 0, "cross_modal_text_layers.3.x": 1,
                                                "mlm_score.bias": 2, "vqa_classifier.0.bias": 3}, "m")
    assert renamed == {"vision_encoder.visual.conv1.weight": 0, "multi_modal_language_layers.3.x": 1,
                       "mlm_head.bias": 2, "vqa_classifier.0.bias": 3}
    with pytest.raises(SystemExit):  # the checkpoint once: CKPT or --torch CKPT
        convert_main(["meter", "--out", os.fspath(tmp_path / "x")])
    assert not os.path.exists(tmp_path / "x")
