"""A PyTorch restatement of the original CLIP-Driven Universal Model (ljwztc/CLIP-Driven-Universal-Model,
`model/Universal_model.py` with `model/SwinUNETR.py` / `model/Unet.py`), for parity tests and benchmarks.

- Swin UNETR: MONAI's `SwinUNETR` (installed version) built with `LegacyPatchMerging`, MONAI 0.9's
  PatchMerging slice order that the original ships (x0..x7 = [0,0,0] [1,0,0] [0,1,0] [0,0,1] [1,0,1]
  [0,1,0] [0,0,1] [1,1,1] on (d, h, w)), without MONAI's final 1x1 conv; forward returns (dec4, out).
  Its submodules sit at the top level as in the released checkpoint (`swinViT.*`, `encoder1.*`, ...).
- UNet3D: the Models-Genesis UNet3D with `ContBatchNorm3d` (batch statistics always), keys `backbone.*`.
- Head, as the reference notes and the original: precls_conv = GroupNorm(16, C) -> ReLU -> Conv 1x1 C->8;
  GAP = GroupNorm(16, C4) -> ReLU -> AdaptiveAvgPool3d(1) -> Conv 1x1 C4->256; text_to_vision Linear
  512->256 + ReLU on the `organ_embedding` buffer (word_embedding) or an nn.Embedding (rand_embedding);
  controller Conv 1x1 512->153 on [image, text]; per-sample dynamic heads through grouped 1x1 convs.

torch and monai are imported lazily (test extras); nothing here is needed to train or run medjax. MONAI's
Swin code calls `einops.rearrange` for plain axis permutations; when einops is not installed, `_classes`
gives that MONAI module a permute-only `rearrange` (patterns of single axis names, e.g. "b c d h w -> b d h w c").
"""
from __future__ import annotations

import functools
from typing import Any

WEIGHT_NUMS = (64, 64, 8)
BIAS_NUMS = (8, 8, 1)


def _permute_rearrange(x, pattern: str):
    """einops.rearrange restricted to pure permutations ("n c d h w -> n d h w c")."""
    source, target = (side.split() for side in pattern.split("->"))
    if sorted(source) != sorted(target) or len(source) != x.dim() or any(not a.isidentifier() for a in source):
        raise ValueError(f"medjax/convert/torch_universal.py: unsupported rearrange pattern {pattern!r}")
    return x.permute(*[source.index(a) for a in target])


def _ensure_rearrange() -> None:
    import monai.networks.nets.swin_unetr as monai_swin
    from monai.utils import optional_import

    if not optional_import("einops")[1]:
        monai_swin.rearrange = _permute_rearrange


@functools.lru_cache(maxsize=None)
def _classes() -> dict[str, Any]:
    """The torch module classes, defined once torch and monai are imported."""
    import torch
    import torch.nn as tnn
    from torch.nn import functional
    from monai.networks.nets.swin_unetr import PatchMergingV2, SwinUNETR

    _ensure_rearrange()
    class LegacyPatchMerging(PatchMergingV2):
        """MONAI 0.9's PatchMerging forward (3D): two sub-grids taken twice, [1,1,0] and [0,1,1] never."""

        def forward(self, x):
            b, d, h, w, c = x.shape
            if d % 2 or h % 2 or w % 2:
                raise ValueError(f"LegacyPatchMerging: spatial size {(d, h, w)} must be even")
            x = torch.cat([x[:, 0::2, 0::2, 0::2], x[:, 1::2, 0::2, 0::2], x[:, 0::2, 1::2, 0::2],
                           x[:, 0::2, 0::2, 1::2], x[:, 1::2, 0::2, 1::2], x[:, 0::2, 1::2, 0::2],
                           x[:, 0::2, 0::2, 1::2], x[:, 1::2, 1::2, 1::2]], -1)
            return self.reduction(self.norm(x))

    class ContBatchNorm3d(tnn.modules.batchnorm._BatchNorm):
        def forward(self, x):
            return functional.batch_norm(x, self.running_mean, self.running_var, self.weight, self.bias, True,
                                         self.momentum, self.eps)

    class LUConv(tnn.Module):
        def __init__(self, cin, cout):
            super().__init__()
            self.conv1 = tnn.Conv3d(cin, cout, kernel_size=3, padding=1)
            self.bn1 = ContBatchNorm3d(cout)
            self.activation = tnn.ReLU()

        def forward(self, x):
            return self.activation(self.bn1(self.conv1(x)))

    def make_n_conv(cin, depth, double_channel=False):
        if double_channel:
            width = 32 * 2 ** (depth + 1)
            return tnn.Sequential(LUConv(cin, width), LUConv(width, width))
        return tnn.Sequential(LUConv(cin, 32 * 2 ** depth), LUConv(32 * 2 ** depth, 32 * 2 ** depth * 2))

    class DownTransition(tnn.Module):
        def __init__(self, cin, depth):
            super().__init__()
            self.ops = make_n_conv(cin, depth)
            self.maxpool = tnn.MaxPool3d(2)
            self.current_depth = depth

        def forward(self, x):
            out = self.ops(x)
            return (out, out) if self.current_depth == 3 else (self.maxpool(out), out)

    class UpTransition(tnn.Module):
        def __init__(self, cin, cout, depth):
            super().__init__()
            self.up_conv = tnn.ConvTranspose3d(cin, cout, kernel_size=2, stride=2)
            self.ops = make_n_conv(cin + cout // 2, depth, double_channel=True)

        def forward(self, x, skip):
            return self.ops(torch.cat((self.up_conv(x), skip), 1))

    class UNet3D(tnn.Module):
        """Models-Genesis UNet3D as the original's `model/Unet.py` (no output transition)."""

        def __init__(self):
            super().__init__()
            self.down_tr64, self.down_tr128 = DownTransition(1, 0), DownTransition(64, 1)
            self.down_tr256, self.down_tr512 = DownTransition(128, 2), DownTransition(256, 3)
            self.up_tr256, self.up_tr128 = UpTransition(512, 512, 2), UpTransition(256, 256, 1)
            self.up_tr64 = UpTransition(128, 128, 0)

        def forward(self, x):
            out64, skip64 = self.down_tr64(x)
            out128, skip128 = self.down_tr128(out64)
            out256, skip256 = self.down_tr256(out128)
            out512, _ = self.down_tr512(out256)
            up = self.up_tr64(self.up_tr128(self.up_tr256(out512, skip256), skip128), skip64)
            return out512, up

    swin_parts = ("swinViT", "encoder1", "encoder2", "encoder3", "encoder4", "encoder10", "decoder5", "decoder4",
                  "decoder3", "decoder2", "decoder1")

    class UniversalTorch(tnn.Module):
        """The original Universal_model forward (module docstring); x (B, 1, X, Y, Z) -> logits (B, K, X, Y, Z)."""

        def __init__(self, backbone="swinunetr", feature_size=48, num_classes=32, encoding="word_embedding",
                     norm_groups=16, legacy_merging=True):
            super().__init__()
            self.backbone_name, self.encoding, self.class_num = backbone, encoding, num_classes
            if backbone == "swinunetr":
                net = SwinUNETR(in_channels=1, out_channels=num_classes, feature_size=feature_size,
                                downsample=LegacyPatchMerging if legacy_merging else "merging")
                for name in swin_parts:
                    setattr(self, name, getattr(net, name))
                channels, channels4 = feature_size, 16 * feature_size
            elif backbone == "unet":
                self.backbone = UNet3D()
                channels, channels4 = 64, 512
            else:
                raise ValueError(f"medjax/convert/torch_universal.py: unknown backbone {backbone!r}")
            self.precls_conv = tnn.Sequential(tnn.GroupNorm(norm_groups, channels), tnn.ReLU(inplace=True),
                                              tnn.Conv3d(channels, 8, kernel_size=1))
            self.GAP = tnn.Sequential(tnn.GroupNorm(norm_groups, channels4), tnn.ReLU(inplace=True),
                                      tnn.AdaptiveAvgPool3d((1, 1, 1)), tnn.Conv3d(channels4, 256, kernel_size=1))
            self.controller = tnn.Conv3d(512, sum(WEIGHT_NUMS + BIAS_NUMS), kernel_size=1)
            if encoding == "rand_embedding":
                self.organ_embedding = tnn.Embedding(num_classes, 256)
            else:
                self.register_buffer("organ_embedding", torch.randn(num_classes, 512))
                self.text_to_vision = tnn.Linear(512, 256)

        def features(self, x):
            """(dec4, out): the original SwinUNETR / UNet3D forward without the output conv."""
            if self.backbone_name == "unet":
                return self.backbone(x)
            hidden = self.swinViT(x, True)
            enc0, enc1 = self.encoder1(x), self.encoder2(hidden[0])
            enc2, enc3 = self.encoder3(hidden[1]), self.encoder4(hidden[2])
            dec4 = self.encoder10(hidden[4])
            dec3 = self.decoder5(dec4, hidden[3])
            out = self.decoder1(self.decoder2(self.decoder3(self.decoder4(dec3, enc3), enc2), enc1), enc0)
            return dec4, out

        def forward(self, x):
            dec4, out = self.features(x)
            if self.encoding == "rand_embedding":
                task = self.organ_embedding.weight[:, :, None, None, None]
            else:
                task = functional.relu(self.text_to_vision(self.organ_embedding))[:, :, None, None, None]
            x_feat = self.GAP(dec4)
            logits = []
            for i in range(x_feat.shape[0]):
                cond = torch.cat([x_feat[i:i + 1].repeat(self.class_num, 1, 1, 1, 1), task], 1)
                params = self.controller(cond)[:, :, 0, 0, 0]
                head = self.precls_conv(out[i:i + 1]).repeat(self.class_num, 1, 1, 1, 1)
                n, _, d, h, w = head.shape
                head = head.reshape(1, -1, d, h, w)
                splits = torch.split_with_sizes(params, list(WEIGHT_NUMS + BIAS_NUMS), dim=1)
                y = head
                for layer in range(3):
                    out_ch = 8 if layer < 2 else 1
                    weight = splits[layer].reshape(n * out_ch, -1, 1, 1, 1)
                    bias = splits[3 + layer].reshape(n * out_ch)
                    y = functional.conv3d(y, weight, bias=bias, groups=n)
                    if layer < 2:
                        y = functional.relu(y)
                logits.append(y.reshape(1, -1, d, h, w))
            return torch.cat(logits, 0)

    return dict(LegacyPatchMerging=LegacyPatchMerging, UNet3D=UNet3D, UniversalTorch=UniversalTorch)


def legacy_patch_merging():
    """The MONAI PatchMerging subclass with MONAI 0.9's slice order (pass as SwinUNETR(downsample=...))."""
    return _classes()["LegacyPatchMerging"]


def swin_unetr_torch(out_channels: int, feature_size: int = 48, legacy_merging: bool = True, **kwargs):
    """MONAI SwinUNETR(in_channels=1, spatial_dims=3) with the legacy or the current PatchMerging."""
    from monai.networks.nets import SwinUNETR

    _classes()  # MONAI's rearrange fallback
    return SwinUNETR(in_channels=kwargs.pop("in_channels", 1), out_channels=out_channels, feature_size=feature_size,
                     downsample=legacy_patch_merging() if legacy_merging else "merging", **kwargs)


def unet3d_torch():
    """The original's Models-Genesis UNet3D (ContBatchNorm3d), forward -> (out512, out_up_64)."""
    return _classes()["UNet3D"]()


def universal_torch(backbone: str = "swinunetr", *, feature_size: int = 48, num_classes: int = 32,
                    encoding: str = "word_embedding", norm_groups: int = 16, legacy_merging: bool = True):
    """The original Universal Model (randomly initialised), state-dict keys as the released checkpoints."""
    return _classes()["UniversalTorch"](backbone, feature_size, num_classes, encoding, norm_groups, legacy_merging)
