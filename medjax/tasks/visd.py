"""ViSD-Boost pretraining on CT-RATE (Cao et al., "Boosting Vision Semantic Density with Anatomy Normality
Modeling for Medical Vision-language Pre-training", ICCV 2025), in the paper's three stages (`config.stage`),
each an experiment initialised from the previous one's workdir (`--set init=DIR`):

  "vse"   vision semantic enhancement: two augmented views, online vision vs. a momentum (EMA) copy,
          medjax.losses.vision_semantic (normal-normal positives, an abnormal organ only with its own view);
          the normality model is not used yet (vae tokens = original tokens).
  "vqvae" anatomy normality modelling: the per-anatomy VQ-VAE on the frozen backbone's stage-4 organ tokens of
          NORMAL organs (medjax.models.visd_vqvae), codebook by EMA.
  "vlp"   fVLM's organ-level image-report contrast (medjax.losses.organ_contrastive) on the hybrid
          (normality-boosted) features; the VQ-VAE frozen.
The model: medjax.models.visd; the data, text tower, temperature clamp and CT-RATE zero-shot evaluation:
fVLM's (medjax.tasks.fvlm, this task's base), except that each organ is scored in its own organ-centred window
(`eval.windows="organ"`, medjax.tasks.visd_data.organ_window; "centre" = fVLM's centre crop).

Params (one tree in every stage, so each stage's `init=` takes the previous one's leaves):
  {"model": the ViSD params, "batch_stats": the backbone's running BN statistics, "codebook": the VQ
   codebook and its EMA state, ["momentum": {"params": vision params, "batch_stats"} in "vse"]}
Everything but "model" is frozen for the optimizer (`optim.frozen`) and written in `post_update`: the new BN
statistics and codebook leave `loss_fn` as the metrics entry STATE (consumed there), the momentum encoder
moves by EMA (`loss.momentum`, 0.995 as the released model's default). Which "model" parts train is each
stage's `optim.frozen` (experiments/_visd.py).
"""
from __future__ import annotations

import functools

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from medjax.config import ConfigError
from medjax.data.pipelines.global_batches import eval_batches, global_batch_dataset
from medjax.losses.organ_contrastive import organ_losses, organ_target_entropy
from medjax.losses.vision_semantic import vision_semantic_losses
from medjax.models import visd as visd_lib
from medjax.params import merge_params
from medjax.tasks.fvlm import FVLMTask
from medjax.tasks.fvlm_data import CTReportDataset
from medjax.tasks.visd_data import OrganWindowExample, ViSDExample

STAGES = ("vse", "vqvae", "vlp")
WINDOWS = ("organ", "centre")  # eval.windows: organ-centred windows (the released eval) | fVLM's centre crop
STATE = "state_update"  # metrics entry with the new batch_stats / codebook, consumed by post_update


def _organs_first(x):
    return jnp.swapaxes(x, 0, 1)


class ViSDTask(FVLMTask):
    def __init__(self, config, log=print, run=None):
        self.stage = str(config.stage)
        if self.stage not in STAGES:
            raise ConfigError(f"config stage={self.stage!r}: expected one of {', '.join(STAGES)}")
        step = visd_lib.STAGE_POOL[-1]
        if any(int(c) % t for c, t in zip(config.data.crop_shape, step)):
            raise ConfigError(f"config data.crop_shape={tuple(config.data.crop_shape)}: ViSD-Boost needs multiples of "
                              f"{step} (D, H, W), the backbone's stage-4 token size")
        windows = str(config.eval.get("windows", "centre"))
        if windows not in WINDOWS:
            raise ConfigError(f"config eval.windows={windows!r}: expected one of {', '.join(WINDOWS)}")
        window = tuple(config.eval.get("window_shape", config.data.crop_shape))
        if len(window) != 3 or any(int(c) <= 0 or int(c) % t for c, t in zip(window, step)):
            raise ConfigError(f"config eval.window_shape={window}: expected 3 positive multiples of {step} (D, H, W)")
        super().__init__(config, log, run)

    def build_model(self, text, dtype):
        m = self.config.model
        vision = visd_lib.ViSDVision(
            num_organs=len(self.organs), depth=m.depth, width=m.width, shortcut_type=m.shortcut_type,
            detach_shortcut=m.detach_shortcut, token_dim=m.token_dim, pool_heads=m.pool_heads, embed_dim=m.embed_dim,
            dropout=m.dropout, vq=m.vq.to_dict(), dtype=dtype)
        return visd_lib.ViSD(vision, text, embed_dim=m.embed_dim, init_temperature=self.config.loss.init_temperature,
                             dtype=dtype)

    # ---- shapes and params ---------------------------------------------------------------------------
    def init_batch(self) -> dict:
        batch = super().init_batch()
        if self.stage == "vse":
            batch.update(volumes_b=batch["volumes"].copy(), masks_b=batch["masks"].copy(), intact_b=batch["intact"].copy())
        return batch

    def init_params(self, rng):
        batch = {k: jnp.asarray(v[:1]) for k, v in self.init_batch().items()}
        variables = self.model.init({"params": rng, "dropout": rng}, batch["volumes"], batch["masks"],
                                    batch["input_ids"], batch["attention_mask"])
        params = {"model": variables["params"], "batch_stats": variables["batch_stats"],
                  "codebook": variables["codebook"]}
        if self.stage == "vse":
            vision = {k: v for k, v in variables["params"]["vision"].items() if k != "vqvae"}
            params["momentum"] = {"params": jax.tree.map(lambda x: x, vision),
                                  "batch_stats": jax.tree.map(lambda x: x, variables["batch_stats"]["vision"])}
        return params

    def initial_params(self, params):
        """The text tower from `model.init_text` (CXR-BERT in the paper)."""
        if self._text_variables is None:
            return params
        merged, report = merge_params(params["model"]["text"], self._text_variables["params"])
        self.log(f"text encoder from {self.text_init}: {report}")
        return dict(params, model=dict(params["model"], text=merged))

    def _variables(self, params) -> dict:
        return {"params": params["model"], "batch_stats": params["batch_stats"], "codebook": params["codebook"]}

    # ---- losses ----------------------------------------------------------------------------------------
    def loss_fn(self, params, batch, rng, train):
        return {"vse": self._vse_loss, "vqvae": self._vqvae_loss, "vlp": self._vlp_loss}[self.stage](
            params, batch, rng, train)

    def _vision(self, variables, volumes, masks, rng, train, mutable):
        """Organ embeddings of the vision side alone (no normality model), and its new batch_stats."""
        apply = functools.partial(self.model.vision.apply, variables, volumes, masks, use_vq=False, train=train,
                                  rngs={"dropout": rng})
        if not mutable:
            return apply(), variables["batch_stats"]
        out, new = apply(mutable=["batch_stats"])
        return out, new["batch_stats"]

    def _vse_loss(self, params, batch, rng, train):
        b = batch["volumes"].shape[0]
        volumes = jnp.concatenate([batch["volumes"], batch["volumes_b"]])  # both views in one pass (BN over both)
        masks = jnp.concatenate([batch["masks"], batch["masks_b"]])
        online = {"params": params["model"]["vision"], "batch_stats": params["batch_stats"]["vision"]}
        q, stats = self._vision(online, volumes, masks, rng, train, train)
        k, _ = self._vision(jax.lax.stop_gradient(params["momentum"]), volumes, masks, jax.random.fold_in(rng, 1),
                            train, False)
        q_a, q_b, k_a, k_b = q[:b], q[b:], k[:b], k[b:]
        valid = (batch["intact"] & batch["intact_b"]).T
        per_organ, taken = vision_semantic_losses(_organs_first(q_a), _organs_first(q_b), _organs_first(k_a),
                                                  _organs_first(k_b), batch["normal"].T, valid,
                                                  float(self.config.loss.vse_temperature))
        metrics = {"organs_taken": taken.sum().astype(jnp.float32),
                   STATE: {"batch_stats": {"vision": jax.lax.stop_gradient(stats)}}}
        metrics.update({f"{organ}_vse_loss": per_organ[i] for i, organ in enumerate(self.organs)})
        return jnp.sum(per_organ), metrics

    def _vqvae_loss(self, params, batch, rng, train):
        weights = batch["normal"]  # the normality model learns from normal organs only (the paper)
        apply = functools.partial(self.model.apply, self._variables(params), batch["volumes"], batch["masks"], weights,
                                  train=train, method=visd_lib.ViSD.vq_losses, rngs={"dropout": rng})
        if train:
            losses, new = apply(mutable=["codebook"])
            codebook = jax.lax.stop_gradient(new["codebook"])
        else:
            losses, codebook = apply(), params["codebook"]
        metrics = {"reconstruction_loss": losses["reconstruction"], "commitment_loss": losses["commitment"],
                   "normal_organs": jnp.sum(weights).astype(jnp.float32), STATE: {"codebook": codebook}}
        return losses["reconstruction"] + losses["commitment"], metrics

    def _vlp_loss(self, params, batch, rng, train):
        variables = self._variables(params)
        (image, stats) = self.model.apply(variables, batch["volumes"], batch["masks"], train=train,
                                          method=visd_lib.ViSD.image_embeddings, rngs={"dropout": rng},
                                          mutable=["batch_stats"])
        text = self.model.apply(variables, batch["input_ids"], batch["attention_mask"], train=train,
                                method=visd_lib.ViSD.text_embeddings, rngs={"dropout": jax.random.fold_in(rng, 1)})
        temp = params["model"]["temp"]
        per_organ, taken = organ_losses(_organs_first(image), _organs_first(text), batch["normal"].T,
                                        batch["text_ids"].T, batch["intact"].T, temp)
        metrics = {"temperature": jnp.asarray(temp, jnp.float32), "organs_taken": taken.sum().astype(jnp.float32),
                   "target_entropy": organ_target_entropy(batch["normal"].T, batch["text_ids"].T, batch["intact"].T, taken),
                   STATE: {"batch_stats": jax.lax.stop_gradient(stats["batch_stats"]) if train else
                           params["batch_stats"]}}
        metrics.update({f"{organ}_loss": per_organ[i] for i, organ in enumerate(self.organs)})
        return jnp.sum(per_organ), metrics

    def post_update(self, params, metrics, step):
        """New BN statistics / codebook from the step; the momentum encoder's EMA ("vse"); the temperature clamp."""
        metrics = dict(metrics)
        params = dict(params, **metrics.pop(STATE))
        if self.stage == "vse":
            m = float(self.config.loss.momentum)
            online = {"params": {k: v for k, v in params["model"]["vision"].items() if k != "vqvae"},
                      "batch_stats": params["batch_stats"]["vision"]}
            params["momentum"] = jax.tree.map(lambda t, s: m * t + (1.0 - m) * s, params["momentum"], online)
        low, high = float(self.config.loss.min_temperature), float(self.config.loss.max_temperature)
        params["model"] = dict(params["model"], temp=jnp.clip(params["model"]["temp"], low, high))
        return params, metrics

    # ---- data ---------------------------------------------------------------------------------------
    def train_data(self):
        d = self.config.data
        transform = ViSDExample(self.tokenizer, self.crop_shape, d.max_length, train=True, flip_p=d.flip_p,
                                two_views=self.stage == "vse")
        return global_batch_dataset(self.dataset(d.split), global_batch=self.global_batch, transform=transform,
                                    seed=int(self.config.seed), process_index=jax.process_index(),
                                    process_count=jax.process_count(), prefetch_threads=int(d.prefetch_threads),
                                    on_bad_example=self.on_bad_example)

    # ---- evaluation ---------------------------------------------------------------------------------
    def eval_image_embeddings(self, test: CTReportDataset, image_fn) -> tuple[np.ndarray, np.ndarray]:
        """eval.windows="organ" (default): organ o's embedding from the window centred on organ o
        (medjax.tasks.visd_data.organ_window, one forward per evaluated organ); "centre": fVLM's centre crop."""
        e = self.config.eval
        if str(e.get("windows", "centre")) == "centre":
            return super().eval_image_embeddings(test, image_fn)
        transform = OrganWindowExample(tuple(e.window_shape), len(self.organs), float(e.min_organ_fraction))
        scored = sorted({self.organs.index(organ) for _, organ, _ in e.labels if organ in self.organs})
        embeds, intact = [], []
        for batch in eval_batches(test, int(self.run.eval_batch_size), transform):
            valid = batch["valid"]
            out = np.zeros((int(valid.sum()), len(self.organs), int(self.config.model.embed_dim)), np.float32)
            for o in scored:
                out[:, o] = np.asarray(image_fn(jnp.asarray(batch["volumes"][:, o]),
                                                jnp.asarray(batch["masks"][:, o])))[valid, o]
            keep = np.zeros_like(batch["intact"][valid])
            keep[:, scored] = batch["intact"][valid][:, scored]
            embeds.append(out), intact.append(keep)
        return np.concatenate(embeds), np.concatenate(intact)

    def embedding_functions(self, params):
        """The CT-RATE zero-shot protocol's embeddings (fVLM's evaluate): hybrid features, running BN statistics."""
        params = jax.device_put(nn.unbox(params))
        variables = self._variables(params)
        model = self.model
        image_fn = jax.jit(lambda v, x, m: model.apply(v, x, m, method=visd_lib.ViSD.image_embeddings))
        text_fn = jax.jit(lambda v, i, a: model.apply(v, i, a, method=visd_lib.ViSD.text_embeddings))
        return (functools.partial(image_fn, variables), functools.partial(text_fn, variables),
                float(np.asarray(params["model"]["temp"])))
