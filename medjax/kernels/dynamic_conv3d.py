"""The Universal Model's dynamic segmentation head (Liu et al., ICCV 2023, Sec. 3, text-based
controller: P_k = Sigmoid(((F * theta_k1) * theta_k2) * theta_k3), the sigmoid applied outside).

A controller predicts, per sample and class, 153 numbers that are the weights of a tiny
per-voxel MLP over the 8-channel head feature (three 1x1x1 convolutions in the original):
    h1 = relu(W1 x + b1),  h2 = relu(W2 h1 + b2),  logit = W3 h2 + b3.
The 153 are split in the original's order (`parse_dynamic_params` in model/Universal_model.py):
weights first, then biases: W1 = p[0:64] as (8 out, 8 in) row-major, W2 = p[64:128],
W3 = p[128:136] (1 x 8), b1 = p[136:144], b2 = p[144:152], b3 = p[152].

`dynamic_head_reference` is the definition in plain jnp; like the original's grouped
convolutions it materialises (batch, voxels, classes, 8) hidden activations per layer. The
Pallas kernel makes one pass over voxel tiles, runs all classes' three layers on the tile in
VMEM/registers (classes in chunks: layer 1 as 8 rank-1 updates, layers 2 and 3 as matmuls with
block-diagonal weights) and writes only the logits. Its custom_vjp backward recomputes the
hidden activations per tile and writes dfeatures plus per-program partial parameter gradients
(summed over programs outside the kernel), so no (voxels x classes x 8) array reaches HBM.
"""
from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl

from medjax.kernels import _pallas_util as pu

_WHERE = "medjax/kernels/dynamic_conv3d.py"
CHANNELS = 8  # head feature channels = hidden width of the dynamic MLP
PARAMS_PER_CLASS = 153  # 64 + 64 + 8 weights, then 8 + 8 + 1 biases
_SPLITS = (64, 64, 8, 8, 8, 1)  # W1, W2, W3, b1, b2, b3
_NT = (((1,), (1,)), ((), ()))  # dot_general numbers for a @ b.T


def _check_inputs(features: jax.Array, params: jax.Array, where: str) -> None:
    if features.ndim != 5 or features.shape[-1] != CHANNELS:
        raise ValueError(f"{where}: features must be (batch, D, H, W, {CHANNELS}), got {features.shape}")
    if params.ndim != 3 or params.shape[-1] != PARAMS_PER_CLASS or params.shape[0] != features.shape[0]:
        raise ValueError(f"{where}: params must be (batch={features.shape[0]}, classes, {PARAMS_PER_CLASS}), "
                         f"got {params.shape}")


def split_dynamic_params(params: jax.Array) -> tuple[jax.Array, ...]:
    """(batch, classes, 153) -> W1 (b,c,8,8), W2 (b,c,8,8), W3 (b,c,1,8), b1 (b,c,8), b2 (b,c,8),
    b3 (b,c,1); W as (out, in), in the original's split order (weights first, then biases)."""
    offsets = [0]
    for n in _SPLITS:
        offsets.append(offsets[-1] + n)
    w1, w2, w3, b1, b2, b3 = (params[..., a:b] for a, b in zip(offsets[:-1], offsets[1:]))
    lead = params.shape[:-1]
    return (w1.reshape(*lead, CHANNELS, CHANNELS), w2.reshape(*lead, CHANNELS, CHANNELS),
            w3.reshape(*lead, 1, CHANNELS), b1, b2, b3)


def dynamic_head_reference(features: jax.Array, params: jax.Array) -> jax.Array:
    """Universal Model dynamic head: per class and voxel, W3 relu(W2 relu(W1 x + b1) + b2) + b3.

    features (batch, D, H, W, 8), params (batch, classes, 153) -> logits (batch, D, H, W, classes),
    computed in fp32 (as the original) and returned in the promoted input dtype.
    """
    _check_inputs(features, params, f"{_WHERE} dynamic_head_reference")
    out_dtype = jnp.result_type(features.dtype, params.dtype)
    w1, w2, w3, b1, b2, b3 = split_dynamic_params(params.astype(jnp.float32))
    x = features.astype(jnp.float32)
    h = jax.nn.relu(jnp.einsum("bdhwi,bcoi->bdhwco", x, w1) + b1[:, None, None, None])
    h = jax.nn.relu(jnp.einsum("bdhwci,bcoi->bdhwco", h, w2) + b2[:, None, None, None])
    logits = jnp.einsum("bdhwci,bcoi->bdhwco", h, w3)[..., 0] + b3[:, None, None, None, :, 0]
    return logits.astype(out_dtype)


# --------------------------------------------------------------------------- Pallas kernel

@dataclasses.dataclass(frozen=True)
class DynamicHeadBlockSizes:
    """Tiles of the dynamic-head kernel.

    block_voxels: voxel rows per tile (power of two on GPU, multiple of 8 on TPU).
    chunk_classes: classes per inner step; their hidden units (8 * chunk_classes wide) go
    through layers 2 and 3 as one block-diagonal matmul (power of two >= 2 on GPU).
    backward_voxels: voxel rows one backward program walks (in tiles), summing its parameter
    gradients; partial sums per program are added outside the kernel.
    num_warps / num_stages: Triton launch parameters (GPU only).
    """

    block_voxels: int = 64
    chunk_classes: int = 4
    backward_voxels: int = 4096
    num_warps: int = 4
    num_stages: int = 2

    @classmethod
    def for_backend(cls, backend: str) -> "DynamicHeadBlockSizes":
        if backend == "tpu":  # 128-lane hidden chunks, VMEM-sized backward slabs
            return cls(block_voxels=512, chunk_classes=16, backward_voxels=2048)
        if backend == "cpu":  # interpret mode: fewer, larger grid steps
            return cls(block_voxels=512, chunk_classes=16, backward_voxels=4096)
        return cls()


@dataclasses.dataclass(frozen=True)
class _Plan:
    """Static launch description (hashable: a custom_vjp nondiff argument)."""

    classes: int
    classes_padded: int
    chunk_classes: int
    block_voxels: int
    backward_voxels: int
    backend: str
    interpret: bool
    num_warps: int
    num_stages: int

    @property
    def chunk_width(self) -> int:
        return CHANNELS * self.chunk_classes

    @property
    def num_chunks(self) -> int:
        return self.classes_padded // self.chunk_classes

    def compiler_params(self):
        return pu.compiler_params(self.backend, 2, num_warps=self.num_warps, num_stages=self.num_stages)


def _pack_params(params: jax.Array, plan: _Plan) -> tuple[jax.Array, ...]:
    """Per-sample kernel weights: w1t (b, 8, 8C') [i, c*8+o] = W1[c,o,i]; b1, b2 (b, 1, 8C');
    w2 (b, 8C', 8cc): chunk g's block-diagonal (in, out) matrix in rows g*8cc..; w3 (b, 8C', C')
    block-diagonal (in, class); b3 (b, 1, C'). Padded classes have zero weights."""
    batch, cp, cc = params.shape[0], plan.classes_padded, plan.chunk_classes
    params = pu.pad_axis(params.astype(jnp.float32), 1, cp)
    w1, w2, w3, b1, b2, b3 = split_dynamic_params(params)
    w1t = jnp.transpose(w1, (0, 3, 1, 2)).reshape(batch, CHANNELS, cp * CHANNELS)
    w2t = jnp.swapaxes(w2, -1, -2).reshape(batch, plan.num_chunks, cc, CHANNELS, 1, CHANNELS)
    same = (jnp.arange(cc)[:, None] == jnp.arange(cc)[None, :])[None, None, :, None, :, None]
    w2bd = jnp.where(same, w2t, 0.0).reshape(batch, cp * CHANNELS, plan.chunk_width)
    same = (jnp.arange(cp)[:, None] == jnp.arange(cp)[None, :])[None, :, None, :]
    w3bd = jnp.where(same, w3[:, :, 0, :, None], 0.0).reshape(batch, cp * CHANNELS, cp)
    return (w1t, b1.reshape(batch, 1, -1), w2bd, b2.reshape(batch, 1, -1), w3bd, b3.reshape(batch, 1, cp))


def _unpack_grads(dw1t, db1, dw2bd, db2, dw3bd, db3, plan: _Plan) -> jax.Array:
    """Inverse of _pack_params for gradients: keeps the block-diagonal entries -> (b, classes, 153)."""
    batch, cp, cc = dw1t.shape[0], plan.classes_padded, plan.chunk_classes
    dw1 = jnp.transpose(dw1t.reshape(batch, CHANNELS, cp, CHANNELS), (0, 2, 3, 1))  # (b, c, o, i)
    dw2 = dw2bd.reshape(batch, plan.num_chunks, cc, CHANNELS, cc, CHANNELS)  # (b, g, c, i, c', o)
    dw2 = jnp.diagonal(dw2, axis1=2, axis2=4)  # (b, g, i, o, c)
    dw2 = jnp.transpose(dw2, (0, 1, 4, 3, 2)).reshape(batch, cp, CHANNELS, CHANNELS)  # (b, c, o, i)
    dw3 = jnp.diagonal(dw3bd.reshape(batch, cp, CHANNELS, cp), axis1=1, axis2=3)  # (b, i, c)
    flat = [dw1.reshape(batch, cp, -1), dw2.reshape(batch, cp, -1), jnp.swapaxes(dw3, 1, 2),
            db1.reshape(batch, cp, CHANNELS), db2.reshape(batch, cp, CHANNELS), db3.reshape(batch, cp, 1)]
    return jnp.concatenate(flat, axis=-1)[:, :plan.classes]


def _columns(x: jax.Array) -> list[jax.Array]:
    """The 8 columns of a (rows, 8) tile as (rows, 1) arrays (masked sums: no lane slicing)."""
    lane = lax.broadcasted_iota(jnp.int32, x.shape, 1)
    return [jnp.sum(jnp.where(lane == i, x, 0.0), axis=1, keepdims=True) for i in range(x.shape[1])]


def _rows(w: jax.Array) -> list[jax.Array]:
    """The rows of an (8, n) tile as (1, n) arrays (masked sums: no sublane slicing)."""
    row = lax.broadcasted_iota(jnp.int32, w.shape, 0)
    return [jnp.sum(jnp.where(row == i, w, 0.0), axis=0, keepdims=True) for i in range(w.shape[0])]


def _stack(parts: list[jax.Array], axis: int) -> jax.Array:
    """Inverse of _columns (axis=1) / _rows (axis=0): places part i at index i of `axis`."""
    shape = list(parts[0].shape)
    shape[axis] = len(parts)
    index = lax.broadcasted_iota(jnp.int32, tuple(shape), axis)
    out = jnp.zeros(tuple(shape), jnp.float32)
    for i, part in enumerate(parts):
        out = jnp.where(index == i, part, out)
    return out


def _chunk_forward(x_cols, w1_ref, b1_ref, w2_ref, b2_ref, chunk: int, plan: _Plan):
    """Layers 1-2 for one chunk of classes: (z1, h1, z2, h2, w1 rows, w2 block), each (rows, 8cc)."""
    cols = pl.ds(chunk * plan.chunk_width, plan.chunk_width)
    w1_rows = _rows(w1_ref[:, cols])
    z1 = b1_ref[:, cols]
    for x_i, w_i in zip(x_cols, w1_rows):
        z1 = z1 + x_i * w_i
    h1 = jnp.maximum(z1, 0.0)
    w2 = w2_ref[pl.ds(chunk * plan.chunk_width, plan.chunk_width), :]
    z2 = jnp.dot(h1, w2, preferred_element_type=jnp.float32) + b2_ref[:, cols]
    return z1, h1, z2, jnp.maximum(z2, 0.0), w1_rows, w2


def _forward_kernel(x_ref, w1_ref, b1_ref, w2_ref, b2_ref, w3_ref, b3_ref, o_ref, *, plan: _Plan):
    x_cols = _columns(x_ref[...].astype(jnp.float32))
    out = jnp.zeros(o_ref.shape, jnp.float32) + b3_ref[...]
    for chunk in range(plan.num_chunks):
        *_, h2, _, _ = _chunk_forward(x_cols, w1_ref, b1_ref, w2_ref, b2_ref, chunk, plan)
        w3 = w3_ref[pl.ds(chunk * plan.chunk_width, plan.chunk_width), :]
        out = out + jnp.dot(h2, w3, preferred_element_type=jnp.float32)
    o_ref[...] = out.astype(o_ref.dtype)


def _backward_kernel(x_ref, g_ref, w1_ref, b1_ref, w2_ref, b2_ref, w3_ref,
                     dx_ref, dw1_ref, db1_ref, dw2_ref, db2_ref, dw3_ref, db3_ref, *, plan: _Plan):
    grads = (dw1_ref, db1_ref, dw2_ref, db2_ref, dw3_ref, db3_ref)
    for ref in grads:
        ref[...] = jnp.zeros(ref.shape, ref.dtype)
    tile, width = plan.block_voxels, plan.chunk_width

    def body(t, carry):
        rows = pl.ds(pl.multiple_of(t * tile, tile), tile)
        x_cols = _columns(x_ref[rows, :].astype(jnp.float32))
        g = g_ref[rows, :].astype(jnp.float32)
        db3_ref[...] += jnp.sum(g, axis=0, keepdims=True)
        dx_cols = [jnp.zeros((tile, 1), jnp.float32) for _ in x_cols]
        for chunk in range(plan.num_chunks):
            z1, h1, z2, h2, w1_rows, w2 = _chunk_forward(x_cols, w1_ref, b1_ref, w2_ref, b2_ref, chunk, plan)
            hidden = pl.ds(chunk * width, width)  # this chunk's hidden units (rows of w2, w3; lanes of b1, b2, w1t)
            w3 = w3_ref[hidden, :]
            dw3_ref[hidden, :] += jnp.dot(h2.T, g, preferred_element_type=jnp.float32)
            dz2 = jnp.where(z2 > 0, lax.dot_general(g, w3, _NT, preferred_element_type=jnp.float32), 0.0)
            dw2_ref[hidden, :] += jnp.dot(h1.T, dz2, preferred_element_type=jnp.float32)
            db2_ref[:, hidden] += jnp.sum(dz2, axis=0, keepdims=True)
            dz1 = jnp.where(z1 > 0, lax.dot_general(dz2, w2, _NT, preferred_element_type=jnp.float32), 0.0)
            db1_ref[:, hidden] += jnp.sum(dz1, axis=0, keepdims=True)
            dw1_ref[:, hidden] += _stack([jnp.sum(x_i * dz1, axis=0, keepdims=True) for x_i in x_cols], 0)
            dx_cols = [d + jnp.sum(dz1 * w_i, axis=1, keepdims=True) for d, w_i in zip(dx_cols, w1_rows)]
        dx_ref[rows, :] = _stack(dx_cols, 1).astype(dx_ref.dtype)
        return carry

    lax.fori_loop(0, plan.backward_voxels // tile, body, 0)


def _weight_specs(plan: _Plan, index_map) -> list[pl.BlockSpec]:
    cp, hid = plan.classes_padded, plan.classes_padded * CHANNELS
    shapes = [(CHANNELS, hid), (1, hid), (hid, plan.chunk_width), (1, hid), (hid, cp), (1, cp)]
    return [pl.BlockSpec((None, *shape), index_map) for shape in shapes]


def _forward(features, params, plan: _Plan) -> jax.Array:
    batch, depth, height, width, _ = features.shape
    voxels = depth * height * width
    x = pu.pad_axis(features.reshape(batch, voxels, CHANNELS), 1, pu.round_up(voxels, plan.block_voxels))
    weights = _pack_params(params, plan)
    out_dtype = jnp.result_type(features.dtype, params.dtype)
    tile = lambda b, t: (b, t, 0)  # noqa: E731
    logits = pl.pallas_call(
        functools.partial(_forward_kernel, plan=plan),
        grid=(batch, x.shape[1] // plan.block_voxels),
        in_specs=[pl.BlockSpec((None, plan.block_voxels, CHANNELS), tile),
                  *_weight_specs(plan, lambda b, t: (b, 0, 0))],
        out_specs=pl.BlockSpec((None, plan.block_voxels, plan.classes_padded), tile),
        out_shape=jax.ShapeDtypeStruct((batch, x.shape[1], plan.classes_padded), out_dtype),
        compiler_params=plan.compiler_params(),
        interpret=plan.interpret,
        name="dynamic_head_forward",
    )(x, *weights)
    return logits[:, :voxels, :plan.classes].reshape(batch, depth, height, width, plan.classes)


def _backward(features, params, g, plan: _Plan):
    batch, depth, height, width, _ = features.shape
    voxels = depth * height * width
    padded = pu.round_up(voxels, plan.backward_voxels)
    x = pu.pad_axis(features.reshape(batch, voxels, CHANNELS), 1, padded)
    g = pu.pad_axis(pu.pad_axis(g.reshape(batch, voxels, plan.classes), 2, plan.classes_padded), 1, padded)
    w1t, b1, w2bd, b2, w3bd, _ = _pack_params(params, plan)
    programs = padded // plan.backward_voxels
    slab = lambda b, s: (b, s, 0)  # noqa: E731
    per_program = lambda b, s: (b, s, 0, 0)  # noqa: E731
    grad_specs = [pl.BlockSpec((None, *spec.block_shape), per_program)
                  for spec in _weight_specs(plan, per_program)]
    grad_shapes = [jax.ShapeDtypeStruct((batch, programs, *w.shape[1:]), jnp.float32)
                   for w in (w1t, b1, w2bd, b2, w3bd)] + [
        jax.ShapeDtypeStruct((batch, programs, 1, plan.classes_padded), jnp.float32)]
    dx, *partials = pl.pallas_call(
        functools.partial(_backward_kernel, plan=plan),
        grid=(batch, programs),
        in_specs=[pl.BlockSpec((None, plan.backward_voxels, CHANNELS), slab),
                  pl.BlockSpec((None, plan.backward_voxels, plan.classes_padded), slab),
                  *_weight_specs(plan, lambda b, s: (b, 0, 0))[:5]],
        out_specs=[pl.BlockSpec((None, plan.backward_voxels, CHANNELS), slab), *grad_specs],
        out_shape=[jax.ShapeDtypeStruct(x.shape, features.dtype), *grad_shapes],
        compiler_params=plan.compiler_params(),
        interpret=plan.interpret,
        name="dynamic_head_backward",
    )(x, g, w1t, b1, w2bd, b2, w3bd)
    dparams = _unpack_grads(*(p.sum(axis=1) for p in partials), plan)
    dx = dx[:, :voxels].reshape(features.shape)
    return dx, dparams.astype(params.dtype)


@functools.partial(jax.custom_vjp, nondiff_argnums=(2,))
def _dynamic_head_pallas(features, params, plan: _Plan):
    return _forward(features, params, plan)


def _dynamic_head_pallas_fwd(features, params, plan: _Plan):
    return _forward(features, params, plan), (features, params)


def _dynamic_head_pallas_bwd(plan: _Plan, residuals, g):
    return _backward(*residuals, g, plan)


_dynamic_head_pallas.defvjp(_dynamic_head_pallas_fwd, _dynamic_head_pallas_bwd)


def dynamic_head_pallas(features: jax.Array, params: jax.Array, *,
                        block_sizes: DynamicHeadBlockSizes | None = None,
                        interpret: bool | None = None, backend: str | None = None) -> jax.Array:
    """The Universal Model's dynamic head as a Pallas kernel; same contract as `dynamic_head_reference`.

    backend: which lowering ("gpu": Triton, "tpu": Mosaic, "cpu"); None = the default backend.
    interpret: None = interpret mode unless the backend is a GPU or TPU.
    """
    where = f"{_WHERE} dynamic_head_pallas"
    _check_inputs(features, params, where)
    backend = pu.resolve_backend(backend, where)
    sizes = block_sizes or DynamicHeadBlockSizes.for_backend(backend)
    pu.check_block("block_voxels", sizes.block_voxels, backend, where)
    if sizes.backward_voxels % sizes.block_voxels:
        raise ValueError(f"{where}: backward_voxels={sizes.backward_voxels} must be a multiple of "
                         f"block_voxels={sizes.block_voxels}")
    classes = params.shape[1]
    voxels = features.shape[1] * features.shape[2] * features.shape[3]
    if backend == "gpu":  # Triton: power-of-two tiles, every dot dim >= 16
        if sizes.chunk_classes < 2 or not pu.is_power_of_2(sizes.chunk_classes):
            raise ValueError(f"{where}: chunk_classes={sizes.chunk_classes} must be a power of two >= 2 on GPU")
        classes_padded = max(16, pl.next_power_of_2(classes))
        chunk = min(sizes.chunk_classes, classes_padded)
        block = pu.fit_block(sizes.block_voxels, voxels, 16)
    else:
        if sizes.chunk_classes < 1:
            raise ValueError(f"{where}: chunk_classes must be positive, got {sizes.chunk_classes}")
        chunk = min(sizes.chunk_classes, classes)
        classes_padded = pu.round_up(classes, chunk)
        block = pu.fit_block(sizes.block_voxels, voxels, 8)
    backward_voxels = min(sizes.backward_voxels, pu.round_up(voxels, sizes.block_voxels))
    backward_voxels = pu.round_up(backward_voxels, block)
    plan = _Plan(classes=classes, classes_padded=classes_padded, chunk_classes=chunk, block_voxels=block,
                 backward_voxels=backward_voxels, backend=backend,
                 interpret=pu.resolve_interpret(interpret, backend),
                 num_warps=sizes.num_warps, num_stages=sizes.num_stages)
    return pu.shard_map_over_batch(lambda f, p: _dynamic_head_pallas(f, p, plan), (features, params),
                                   head_dims=(None, None), out_head_dim=None)


def dynamic_head(features: jax.Array, params: jax.Array, *, impl: str = "auto",
                 block_sizes: DynamicHeadBlockSizes | None = None, interpret: bool | None = None) -> jax.Array:
    """The Universal Model's dynamic head through the implementation chosen by `impl`.

    impl (config `kernels.impl`): "auto" = the Pallas kernel on GPU/TPU and, on CPU, the same
    numbers as one XLA fusion (`medjax.kernels.dynamic_head_fused`, reference backward);
    "reference" = `dynamic_head_reference`; "pallas" = the kernel everywhere (interpret mode on
    CPU). block_sizes / interpret only affect the kernel.
    """
    if pu.use_pallas(impl, f"{_WHERE} dynamic_head"):
        return dynamic_head_pallas(features, params, block_sizes=block_sizes, interpret=interpret)
    if impl == "auto":
        from medjax.kernels.dynamic_head_fused import dynamic_head_fused  # imports this module
        return dynamic_head_fused(features, params)
    return dynamic_head_reference(features, params)
