"""DINOv2 training checkpoints in, timm keys out (issue #19).

- `python -m medjax.convert dinov2` on a `teacher_checkpoint.pth` laid out as DINOv2's `do_test` writes it
  ({"teacher": state_dict} with `backbone.` (blocks chunked as FSDP's `block_chunks`: `blocks.<chunk>.<i>.`,
  register tokens, the iBOT mask token), `dino_head.` with torch's weight-normalised last layer): the encoder's
  features equal timm's on the same backbone loaded through timm's own DINOv2 conversion (`checkpoint_filter_fn`),
  with a GELU MLP and with DINOv2's SwiGLU (`mlp.w12` / `mlp.w3`); the head equals the torch head.
- `python -m medjax.convert export-timm` writes what `timm.create_model(**kwargs).load_state_dict(strict=True)`
  takes, with the same features: from the converted DINOv2 params (registers folded into timm's no_embed_class
  layout) and from a `uni_pretrain` run's teacher.
"""
import json
import os

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

torch = pytest.importorskip("torch")
timm = pytest.importorskip("timm")
from safetensors.torch import load_file  # noqa: E402
from timm.models.vision_transformer import checkpoint_filter_fn  # noqa: E402
from torch import nn as tnn  # noqa: E402
from torch.nn import functional as F  # noqa: E402

from medjax.checkpoint import restore_params, save_params  # noqa: E402
from medjax.convert import dinov2 as convert_dinov2  # noqa: E402
from medjax.convert.__main__ import main as convert_main  # noqa: E402
from medjax.models.dinov2 import DINOHead  # noqa: E402

WIDTH, DEPTH, PATCH, IMAGE, REGISTERS = 64, 2, 8, 32, 2


def backbone_tensors(rng, swiglu):
    """A DINOv2 ViT backbone's state dict (`dinov2/models/vision_transformer.py` names), random values."""
    n = (IMAGE // PATCH) ** 2
    t = lambda *shape, scale=0.05: rng.normal(0, scale, shape).astype(np.float32)  # noqa: E731
    state = {"cls_token": t(1, 1, WIDTH, scale=0.5), "pos_embed": t(1, 1 + n, WIDTH, scale=0.5),
             "register_tokens": t(1, REGISTERS, WIDTH, scale=0.5), "mask_token": t(1, WIDTH),
             "patch_embed.proj.weight": t(WIDTH, 3, PATCH, PATCH), "patch_embed.proj.bias": t(WIDTH),
             "norm.weight": 1 + t(WIDTH), "norm.bias": t(WIDTH)}
    hidden = 96
    for i in range(DEPTH):
        b = f"blocks.{i}."
        state |= {b + "norm1.weight": 1 + t(WIDTH), b + "norm1.bias": t(WIDTH), b + "norm2.weight": 1 + t(WIDTH),
                  b + "norm2.bias": t(WIDTH), b + "attn.qkv.weight": t(3 * WIDTH, WIDTH, scale=0.1),
                  b + "attn.qkv.bias": t(3 * WIDTH), b + "attn.proj.weight": t(WIDTH, WIDTH, scale=0.1),
                  b + "attn.proj.bias": t(WIDTH), b + "ls1.gamma": t(WIDTH, scale=0.3), b + "ls2.gamma": t(WIDTH, scale=0.3)}
        if swiglu:  # SwiGLUFFNFused: w12 (2 hidden, D) gate first, w3 (D, hidden)
            state |= {b + "mlp.w12.weight": t(2 * hidden, WIDTH, scale=0.1), b + "mlp.w12.bias": t(2 * hidden),
                      b + "mlp.w3.weight": t(WIDTH, hidden, scale=0.1), b + "mlp.w3.bias": t(WIDTH)}
        else:
            state |= {b + "mlp.fc1.weight": t(4 * WIDTH, WIDTH, scale=0.1), b + "mlp.fc1.bias": t(4 * WIDTH),
                      b + "mlp.fc2.weight": t(WIDTH, 4 * WIDTH, scale=0.1), b + "mlp.fc2.bias": t(WIDTH)}
    return state


class TorchDINOHead(tnn.Module):
    """DINOv2 `layers/dino_head.py` DINOHead (nlayers 3): mlp Linear-GELU-Linear-GELU-Linear, F.normalize, then
    `weight_norm(Linear(bottleneck, K, bias=False))` (its weight_g filled with 1 by DINOv2, trained after)."""

    def __init__(self, in_dim, out_dim, hidden, bottleneck):
        super().__init__()
        self.mlp = tnn.Sequential(tnn.Linear(in_dim, hidden), tnn.GELU(), tnn.Linear(hidden, hidden), tnn.GELU(),
                                  tnn.Linear(hidden, bottleneck))
        self.last_layer = tnn.utils.weight_norm(tnn.Linear(bottleneck, out_dim, bias=False))

    def forward(self, x):
        return self.last_layer(F.normalize(self.mlp(x), dim=-1, p=2, eps=1e-12))


def timm_reference(backbone, swiglu):
    """timm's ViT loaded through timm's own DINOv2 conversion (registers -> no_embed_class, w12/w3 -> fc1/fc2)."""
    kwargs = dict(img_size=IMAGE, patch_size=PATCH, embed_dim=WIDTH, depth=DEPTH, num_heads=1, init_values=1e-5,
                  reg_tokens=REGISTERS, no_embed_class=True, num_classes=0)
    if swiglu:
        kwargs |= dict(mlp_layer=timm.layers.SwiGLUPacked, act_layer=torch.nn.SiLU, mlp_ratio=2 * 96 / WIDTH)
    model = timm.create_model("vit_small_patch16_224", pretrained=False, **kwargs).eval()
    state = checkpoint_filter_fn({k: torch.from_numpy(v.copy()) for k, v in backbone.items()}, model)
    model.load_state_dict(state, strict=True)
    return model


def timm_features(model, x):
    with torch.no_grad():
        return model(torch.from_numpy(x.transpose(0, 3, 1, 2).copy())).numpy()


@pytest.fixture(scope="module")
def images():
    return np.random.default_rng(5).normal(size=(2, IMAGE, IMAGE, 3)).astype(np.float32)


pytestmark = pytest.mark.filterwarnings("ignore:`torch.nn.utils.weight_norm` is deprecated")


@pytest.fixture(scope="module", params=[False, True], ids=["gelu", "swiglu"])
def checkpoint(request, tmp_path_factory):
    swiglu = request.param
    rng = np.random.default_rng(1 + swiglu)
    backbone = backbone_tensors(rng, swiglu)
    torch.manual_seed(0)
    head = TorchDINOHead(WIDTH, 48, 40, 16)
    with torch.no_grad():
        head.last_layer.weight_g.mul_(1.5)  # a trained gain, not DINOv2's initial 1
    teacher = {}
    for key, value in backbone.items():  # FSDP block_chunks=2: blocks.<chunk>.<global index>.
        if key.startswith("blocks."):
            i = int(key.split(".")[1])
            key = f"blocks.{i}.{i}." + key.split(".", 2)[2]
        teacher["backbone." + key] = torch.from_numpy(value.copy())
    teacher |= {"dino_head." + k: v.detach().clone() for k, v in head.state_dict().items()}
    path = str(tmp_path_factory.mktemp("dinov2") / "teacher_checkpoint.pth")
    torch.save({"teacher": teacher}, path)
    return path, swiglu, timm_reference(backbone, swiglu), head


def test_teacher_checkpoint_matches_timm_and_the_torch_head(checkpoint, images):
    path, swiglu, reference, head = checkpoint
    model, variables, report = convert_dinov2.load_with_report(path)
    assert report.ignored == ("mask_token",)
    assert (model.num_register_tokens, model.no_embed_class, model.mlp_activation) == (
        REGISTERS, False, "swiglu" if swiglu else "gelu")
    np.testing.assert_allclose(np.asarray(model.apply({"params": {"encoder": variables["params"]["encoder"]}}, images)),
                               timm_features(reference, images), atol=1e-4, rtol=1e-4)
    x = np.random.default_rng(2).normal(size=(3, WIDTH)).astype(np.float32)
    ours = DINOHead(48, 40, 16, learn_gain=True).apply({"params": variables["params"]["dino_head"]}, jnp.asarray(x))
    with torch.no_grad():
        expected = head(torch.from_numpy(x)).numpy()
    np.testing.assert_allclose(np.asarray(ours), expected, atol=1e-5, rtol=1e-5)


def test_convert_then_export_timm_round_trip(checkpoint, images, tmp_path, capsys):
    path, swiglu, reference, _ = checkpoint
    params_dir, out = str(tmp_path / "params"), str(tmp_path / "backbone.safetensors")
    assert convert_main(["dinov2", "--torch", path, "--out", params_dir]) == 0
    assert set(restore_params(params_dir)) == {"encoder", "dino_head"}
    assert convert_main(["export-timm", "--params", params_dir, "--out", out]) == 0
    assert "timm.create_model" in capsys.readouterr().out
    with open(out + ".timm.json") as f:
        kwargs = json.load(f)["model_args"]
    assert kwargs["no_embed_class"] and kwargs["reg_tokens"] == REGISTERS
    if swiglu:
        assert kwargs.pop("mlp_layer") == "timm.layers.SwiGLUPacked" and kwargs.pop("act_layer") == "torch.nn.SiLU"
        kwargs |= dict(mlp_layer=timm.layers.SwiGLUPacked, act_layer=torch.nn.SiLU)
    exported = timm.create_model("vit_small_patch16_224", pretrained=False, **kwargs).eval()
    exported.load_state_dict(load_file(out), strict=True)
    np.testing.assert_allclose(timm_features(exported, images), timm_features(reference, images), atol=1e-4, rtol=1e-4)
    assert convert_main(["export-timm", "--params", params_dir, "--out", out]) == 2  # refuses to overwrite


def test_export_timm_of_a_uni_pretrain_teacher(tmp_path, images):
    """A (tiny) UNI pretraining run's teacher backbone, perturbed as if trained, exported: timm's features are the
    teacher's CLS feature (DINOv2's class token with its position embedding: timm's standard layout)."""
    from medjax import config as config_lib
    from medjax.models.dinov2 import DINOv2Network
    from medjax.tasks.uni_pretrain import network_from_config

    config = config_lib.get_config("uni_vitl16", "tiny")
    network = network_from_config(config)
    crops = jnp.zeros((1, IMAGE, IMAGE, 3))
    init = jax.jit(lambda: nn.unbox(network.init(jax.random.key(0), crops, jnp.zeros((1, 16, 16, 3)),
                                                 jnp.zeros((1, (IMAGE // PATCH) ** 2), bool))["params"]))
    rng = np.random.default_rng(3)
    params = jax.tree.map(lambda x: np.asarray(x) + rng.normal(0, 0.2, x.shape).astype(np.float32), init())
    run = str(tmp_path / "run")
    save_params(run, {"student": params, "teacher": params, "teacher_temp": jnp.float32(0.07)})
    out = str(tmp_path / "teacher.bin")
    assert convert_main(["export-timm", "--params", run, "--out", out]) == 0
    with open(out + ".timm.json") as f:
        kwargs = json.load(f)["model_args"]
    assert "no_embed_class" not in kwargs and kwargs["embed_dim"] == config.model.width
    exported = timm.create_model("vit_small_patch16_224", pretrained=False, **kwargs).eval()
    exported.load_state_dict(torch.load(out, weights_only=True), strict=True)
    ours = jax.jit(lambda p, x: network.apply({"params": p}, x, method=DINOv2Network.features)["cls_token"])(params, images)
    np.testing.assert_allclose(timm_features(exported, images), np.asarray(ours), atol=1e-4, rtol=1e-4)
    assert os.path.isfile(out)
