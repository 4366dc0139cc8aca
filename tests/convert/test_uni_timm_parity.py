"""UNI and UNI2-h against timm itself: `timm.create_model` with the kwargs the model cards publish (random
weights, perturbed so LayerScale, registers and position embeddings all matter; depth 2 to stay fast), saved as
a state dict, read by `medjax.convert.uni.load` with no architecture arguments (everything is read off the
state dict), features within 1e-4 of timm's -- at 224 px and at other image sizes (timm's `dynamic_img_size`:
bicubic, antialiased position-embedding resampling), smaller and larger than the table. The full-depth UNI2-h
layout is compared with timm's on the meta device (shapes only).

UNI (mahmoodlab/UNI README): vit_large_patch16_224, img_size=224, patch_size=16, init_values=1e-5, num_classes=0,
dynamic_img_size=True. UNI2-h (mahmoodlab/UNI2-h model card): vit_giant_patch14_224, img_size=224, patch_size=14,
depth=24, num_heads=24, init_values=1e-5, embed_dim=1536, mlp_ratio=2.66667 * 2, num_classes=0,
no_embed_class=True, mlp_layer=timm.layers.SwiGLUPacked, act_layer=torch.nn.SiLU, reg_tokens=8,
dynamic_img_size=True.
"""
import jax
import numpy as np
import pytest

torch = pytest.importorskip("torch")  # the test extra (torch, timm)
timm = pytest.importorskip("timm")
from safetensors.numpy import save_file  # noqa: E402

from medjax.convert import uni  # noqa: E402
from medjax.models.uni import UNI2_H, uni_fields_from_params  # noqa: E402

UNI_KWARGS = dict(img_size=224, patch_size=16, init_values=1e-5, num_classes=0, dynamic_img_size=True)


def uni2h_kwargs():
    return dict(img_size=224, patch_size=14, depth=24, num_heads=24, init_values=1e-5, embed_dim=1536,
                mlp_ratio=2.66667 * 2, num_classes=0, no_embed_class=True, mlp_layer=timm.layers.SwiGLUPacked,
                act_layer=torch.nn.SiLU, reg_tokens=8, dynamic_img_size=True)


def random_timm(name, seed, **kwargs):
    """timm.create_model(name, **kwargs) with random weights: built on the meta device (timm's own init of a
    1536-wide model takes seconds) and filled with N(0, 0.02^2) matrices, N(0, 0.05^2) biases, LayerNorm scales
    1 + N(0, 0.05^2), N(0, 0.5^2) tokens and position embeddings and N(0, 0.3^2) LayerScale gammas, so that
    blocks, registers and position embeddings all change the feature."""
    with torch.device("meta"):
        model = timm.create_model(name, pretrained=False, **kwargs)
    model = model.to_empty(device="cpu")
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for key, param in model.named_parameters():
            noise = torch.randn(param.shape, generator=generator)
            if key.endswith("gamma"):
                param.copy_(0.3 * noise)
            elif key.endswith(("cls_token", "reg_token", "pos_embed")):
                param.copy_(0.5 * noise)
            elif "norm" in key and key.endswith("weight"):
                param.copy_(1.0 + 0.05 * noise)
            elif param.ndim == 1:
                param.copy_(0.05 * noise)
            else:
                param.copy_(0.02 * noise)
    return model.eval()


def timm_features(model, pixels):
    with torch.no_grad():
        return model(torch.from_numpy(pixels.transpose(0, 3, 1, 2).copy())).numpy()


def pixels(size, seed=0):
    return np.random.default_rng(seed).normal(size=(1, size, size, 3)).astype(np.float32)


@pytest.fixture(scope="module", params=["uni", "uni2h"])
def converted(request, tmp_path_factory):
    if request.param == "uni":
        reference = random_timm("vit_large_patch16_224", 1, depth=2, **UNI_KWARGS)
        sizes = (224, 160)  # the 14 x 14 table; 10 x 10 (antialiased shrink)
    else:
        reference = random_timm("vit_giant_patch14_224", 1, **{**uni2h_kwargs(), "depth": 2})
        sizes = (224, 252)  # the 16 x 16 table; 18 x 18 (enlarged)
    path = str(tmp_path_factory.mktemp(request.param) / "model.safetensors")
    save_file({k: v.detach().numpy().copy() for k, v in reference.state_dict().items()}, path)
    model, variables = uni.load(path)
    return request.param, reference, model, variables, sizes


def test_architecture_is_read_off_the_state_dict(converted):
    name, _, model, variables, _ = converted
    fields = uni_fields_from_params(variables["params"])
    if name == "uni":
        assert (model.width, model.num_heads, model.patch_size, model.num_register_tokens) == (1024, 16, 16, 0)
        assert model.mlp_activation == "gelu" and not model.no_embed_class
    else:
        assert {k: getattr(model, k) for k in UNI2_H if k != "depth"} == {k: v for k, v in UNI2_H.items() if k != "depth"}
        assert variables["params"]["encoder"]["register_tokens"].shape == (1, 8, 1536)
        assert variables["params"]["encoder"]["pos_embed"].shape == (1, 256, 1536)
    assert model.depth == 2 and fields["depth"] == 2
    assert {k: fields[k] for k in ("width", "num_heads", "mlp_dim", "mlp_activation", "num_register_tokens",
                                   "no_embed_class", "image_size")} == \
        {k: getattr(model, k) for k in ("width", "num_heads", "mlp_dim", "mlp_activation", "num_register_tokens",
                                        "no_embed_class", "image_size")}


def test_features_match_timm_at_224_and_other_sizes(converted):
    _, reference, model, variables, sizes = converted
    apply = jax.jit(model.apply)
    for size in sizes:
        x = pixels(size)
        expected = timm_features(reference, x)
        ours = np.asarray(apply(variables, x))
        assert ours.shape == expected.shape == (1, model.width)
        np.testing.assert_allclose(ours, expected, atol=1e-4, rtol=1e-4, err_msg=f"image size {size}")


def test_uni2h_full_layout_matches_timm():
    """24 blocks of UNI2-h: the state dict timm creates (meta device, nothing allocated) is what the converter
    expects, tensor for tensor, and the parameter counts agree."""
    with torch.device("meta"):
        reference = timm.create_model("vit_giant_patch14_224", pretrained=False, **uni2h_kwargs())
    timm_shapes = {k: tuple(v.shape) for k, v in reference.state_dict().items()}
    fields = uni.timm_fields_from_state_dict(timm_shapes_as_arrays(timm_shapes), "meta")
    assert {k: fields[k] for k in UNI2_H} == {**UNI2_H, "mlp_ratio": fields["mlp_ratio"]}
    model = uni.uni_model(**fields)
    shapes = uni.param_shapes(model)
    expected = uni.timm_checkpoint_shapes(model, uni.timm_vit_map(model, shapes))
    assert expected == timm_shapes
    assert sum(int(np.prod(s)) for s in shapes.values()) == sum(p.numel() for p in reference.parameters())


def timm_shapes_as_arrays(shapes):
    """Zero-strided stand-ins with the shapes (the field reader only looks at shapes)."""
    return {k: np.broadcast_to(np.float32(0), s) for k, s in shapes.items()}
