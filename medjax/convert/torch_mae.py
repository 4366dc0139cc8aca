"""A PyTorch restatement of the MAE that MRM's authors train (CityU-AIM-Group/MRM `models_mrm.py`, itself
facebookresearch/mae `models_mae.py`, He et al., "Masked Autoencoders Are Scalable Vision Learners", CVPR 2022),
for parity tests and `python -m medjax.bench vs-torch --exp mrm_retina`.

The encoder is timm's `vit_base_patch16_224` (`timm.create_model`, any width / depth / heads: its
`patch_embed`, `cls_token`, `blocks`, `norm`), its position table replaced by MAE's fixed 2D sin-cos one
(`requires_grad=False`); the decoder is MAE's: `decoder_embed` Linear, `mask_token`, fixed sin-cos
`decoder_pos_embed`, `decoder_blocks` (timm Blocks, 512 wide x 8 in the paper, 16 heads, qkv bias),
`decoder_norm`, `decoder_pred`. So the state dict has the keys of an MAE pretraining checkpoint
(`medjax.convert.mrm_mae` reads them). `forward(images, ids_keep, ids_restore)` takes the masking (MAE's
`random_masking` result) as inputs so that both implementations can be fed the same one; `loss` is MAE's
`forward_loss` (per-patch normalised pixels with the unbiased variance, mean over the masked patches).

torch and timm are imported lazily (test extras); nothing here is needed to train or run medjax.
"""
from __future__ import annotations

import functools

import numpy as np

from medjax.nn.sincos import sincos_2d


def mae_torch(*, image_size: int = 224, patch_size: int = 16, width: int = 768, depth: int = 12, num_heads: int = 12,
              mlp_ratio: float = 4.0, decoder_width: int = 512, decoder_depth: int = 8, decoder_heads: int = 16,
              norm_pix_loss: bool = True):
    """The MAE module (random torch init as timm / MAE leave it; seed torch before calling for fixed weights)."""
    import timm
    import torch
    from timm.models.vision_transformer import Block
    from torch import nn

    grid = image_size // patch_size

    def fixed_table(dim):
        return nn.Parameter(torch.from_numpy(np.asarray(sincos_2d(dim, grid, class_token=True), np.float32))[None],
                            requires_grad=False)

    class MaskedAutoencoderViT(nn.Module):
        def __init__(self):
            super().__init__()
            vit = timm.create_model("vit_base_patch16_224", pretrained=False, num_classes=0, img_size=image_size,
                                    patch_size=patch_size, embed_dim=width, depth=depth, num_heads=num_heads,
                                    mlp_ratio=mlp_ratio)
            self.patch_embed, self.cls_token, self.blocks, self.norm = vit.patch_embed, vit.cls_token, vit.blocks, vit.norm
            self.pos_embed = fixed_table(width)
            self.decoder_embed = nn.Linear(width, decoder_width)
            self.mask_token = nn.Parameter(torch.randn(1, 1, decoder_width) * 0.02)
            self.decoder_pos_embed = fixed_table(decoder_width)
            norm = functools.partial(nn.LayerNorm, eps=1e-6)  # MAE's norm_layer
            self.decoder_blocks = nn.ModuleList([Block(decoder_width, decoder_heads, mlp_ratio, qkv_bias=True,
                                                       norm_layer=norm) for _ in range(decoder_depth)])
            self.decoder_norm = norm(decoder_width)
            self.decoder_pred = nn.Linear(decoder_width, patch_size ** 2 * 3)

        def forward(self, images, ids_keep, ids_restore):
            """images (B, 3, H, W), ids_keep (B, keep), ids_restore (B, N) -> predicted patches (B, N, p^2 3)."""
            x = self.patch_embed(images) + self.pos_embed[:, 1:]
            x = torch.gather(x, 1, ids_keep[..., None].expand(-1, -1, x.shape[-1]))
            cls = (self.cls_token + self.pos_embed[:, :1]).expand(x.shape[0], -1, -1)
            x = torch.cat([cls, x], 1)
            for block in self.blocks:
                x = block(x)
            x = self.decoder_embed(self.norm(x))
            b, n = ids_restore.shape
            mask_tokens = self.mask_token.expand(b, n + 1 - x.shape[1], -1)
            patches = torch.cat([x[:, 1:], mask_tokens], 1)
            patches = torch.gather(patches, 1, ids_restore[..., None].expand(-1, -1, x.shape[-1]))
            x = torch.cat([x[:, :1], patches], 1) + self.decoder_pos_embed
            for block in self.decoder_blocks:
                x = block(x)
            return self.decoder_pred(self.decoder_norm(x))[:, 1:]

        def loss(self, images, pred, mask):
            """MAE `forward_loss`: mask (B, N), 1 = masked (counted)."""
            b, c = images.shape[:2]
            target = images.reshape(b, c, grid, patch_size, grid, patch_size)
            target = torch.einsum("nchpwq->nhwpqc", target).reshape(b, grid * grid, patch_size ** 2 * c)
            if norm_pix_loss:
                mean, var = target.mean(-1, keepdim=True), target.var(-1, keepdim=True)
                target = (target - mean) / (var + 1e-6) ** 0.5
            per_patch = ((pred - target) ** 2).mean(-1)
            return (per_patch * mask).sum() / mask.sum()

    return MaskedAutoencoderViT()
