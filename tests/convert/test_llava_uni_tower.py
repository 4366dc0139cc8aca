"""UNI's ViT as PathChat's vision tower (`model.vision_tower=uni`): a random timm UNI-style ViT (LayerScale,
dynamic image size; depth 3, width 64 to stay fast) saved as safetensors, loaded through `model.init_vision`
by the PathChat task (medjax.convert.uni), gives image features equal to timm's penultimate block output
(class token + patches, no final norm); its pixels use UNI's ImageNet normalisation; the LLaVA model traces on
the tower's features."""
import numpy as np
import pytest

torch = pytest.importorskip("torch")  # the test extra (torch, timm)
timm = pytest.importorskip("timm")
from PIL import Image  # noqa: E402
from safetensors.numpy import save_file  # noqa: E402

from medjax import config as config_lib  # noqa: E402
from medjax.config import ConfigError  # noqa: E402
from medjax.models.uni_vision_tower import IMAGENET_MEAN, IMAGENET_STD, UNIVisionTower  # noqa: E402
from medjax.data.readers.image_io import read_image  # noqa: E402
from medjax.tasks import build_task  # noqa: E402
from medjax.tasks.pathchat_data import image_pixels  # noqa: E402
from tests.convert.test_uni_timm_parity import random_timm  # noqa: E402

DEPTH, SIZE, PATCH = 3, 32, 8


def timm_block_output(model, pixels, blocks):
    """timm VisionTransformer's tokens after `blocks` blocks (forward_features without the final norm)."""
    with torch.no_grad():
        x = model.norm_pre(model._pos_embed(model.patch_embed(torch.from_numpy(pixels.transpose(0, 3, 1, 2).copy()))))
        for block in model.blocks[:blocks]:
            x = block(x)
    return x.numpy()


@pytest.fixture(scope="module")
def uni_task(tmp_path_factory, demo_roots):
    reference = random_timm("vit_large_patch16_224", 4, img_size=SIZE, patch_size=PATCH, embed_dim=64, depth=DEPTH,
                            num_heads=4, init_values=1e-5, num_classes=0, dynamic_img_size=True)
    path = str(tmp_path_factory.mktemp("uni_tower") / "model.safetensors")
    save_file({k: v.detach().numpy().copy() for k, v in reference.state_dict().items()}, path)
    config = config_lib.get_config("pathchat_stage2", "tiny", [
        f"data.dir={demo_roots('pathology_chat')}", "mesh.num_devices=1", "model.vision_tower=uni",
        f"model.init_vision={path}", f"model.vision_feature_depth={DEPTH - 1}", "model.vision_heads=4"])
    return reference, build_task(config, log=lambda *_: None)


def test_uni_tower_features_equal_timms_penultimate_block(uni_task):
    import flax.linen as nn
    import jax

    reference, task = uni_task
    tower = task.model.vision_tower
    assert isinstance(tower, UNIVisionTower) and tower.feature_depth == DEPTH - 1 and task.image_size == SIZE
    pixels = np.random.default_rng(0).normal(size=(2, SIZE, SIZE, 3)).astype(np.float32)
    abstract = nn.unbox(jax.eval_shape(task.init_params, jax.random.key(0)))  # no init compiled: shapes only
    params = task.initial_params(abstract)  # the task's merge: every vision-tower leaf from the checkpoint
    assert all(isinstance(leaf, jax.Array) for leaf in jax.tree.leaves(params["vision_tower"]))
    ours = jax.jit(tower.apply)({"params": params["vision_tower"]}, pixels)
    np.testing.assert_allclose(ours, timm_block_output(reference, pixels, DEPTH - 1), atol=1e-4, rtol=1e-4)
    # UNI's preprocessing (ImageNet statistics) in the training rows; the LLaVA forward reads the tower's features
    item = task.conversations(task.config.data.train_file)[0]
    row = task.example(item)
    expected = image_pixels(Image.fromarray(read_image(item["image"])), SIZE, IMAGENET_MEAN, IMAGENET_STD)
    np.testing.assert_array_equal(row["pixel_values"], expected)
    logits = jax.eval_shape(task.model.apply, {"params": abstract}, row["input_ids"][None],
                            pixel_values=row["pixel_values"][None], attention_mask=row["attention_mask"][None])
    assert logits.shape == (1, task.max_length, task.model.language_model.vocab_size) and logits.dtype == np.float32


def test_uni_tower_refuses_a_hugging_face_llava(demo_roots):
    config = config_lib.get_config("pathchat_stage2", "tiny", [
        f"data.dir={demo_roots('pathology_chat')}", "model.vision_tower=uni", "model.init_llava=/x"])
    with pytest.raises(ConfigError, match="model.vision_tower='uni' needs model.init_vision"):
        build_task(config, log=lambda *_: None)
    config = config_lib.get_config("pathchat_stage2", "tiny", [
        f"data.dir={demo_roots('pathology_chat')}", "model.vision_tower=siglip"])
    with pytest.raises(ConfigError, match="model.vision_tower='siglip': expected 'clip'"):
        build_task(config, log=lambda *_: None)
