"""The MRM objective (Yang et al., ICCV 2023, Sec. 3.2.4) from the outputs of `medjax.models.mrm.MRM`."""
from __future__ import annotations

import jax

from medjax.losses.reconstruction import genome_mse, masked_image_mse
from medjax.losses.relation_matching import cross_relation_matching, self_relation_matching


def mrm_loss(outputs: dict, image: jax.Array, genome: jax.Array, *, patch_size: int, lam: float,
             norm_pix_loss: bool, relation_similarity: str = "cosine") -> tuple[jax.Array, dict[str, jax.Array]]:
    """MRM Sec. 3.2.4: L = L_recon + lam (L_self + L_cross); returns (L, parts). `relation_similarity`: sim of
    the relation matrices ("cosine", or "centered_cosine": features centred over the batch first; see
    `medjax.losses.relation_matching`)."""
    missing = {"image_pred", "genome_pred", "image_pooled", "image_masked_pooled", "genome_pooled",
               "genome_masked_pooled"} - set(outputs)
    if missing:
        raise KeyError(f"medjax/losses/mrm.py mrm_loss: outputs lack {sorted(missing)} (expected MRM.__call__'s dict)")
    parts = {
        "recon_image": masked_image_mse(outputs["image_pred"], image, patch_size, norm_pix_loss=norm_pix_loss),
        "recon_genome": genome_mse(outputs["genome_pred"], genome),
        "self_matching": self_relation_matching(outputs["image_pooled"], outputs["image_masked_pooled"],
                                                outputs["genome_pooled"], outputs["genome_masked_pooled"],
                                                similarity=relation_similarity),
        "cross_matching": cross_relation_matching(outputs["image_pooled"], outputs["genome_pooled"],
                                                  outputs["image_masked_pooled"], outputs["genome_masked_pooled"],
                                                  similarity=relation_similarity),
    }
    loss = parts["recon_image"] + parts["recon_genome"] + lam * (parts["self_matching"] + parts["cross_matching"])
    return loss, parts
