"""The train state, created already sharded: eval_shape(init) -> partition specs -> jit(init,
out_shardings=...). Full params are never materialised on one host (DESIGN style rule 5)."""
from __future__ import annotations

import math
from typing import Any, Callable

import flax.linen as nn
import jax
import jax.numpy as jnp
import optax
from jax.sharding import Mesh, PartitionSpec

from medjax.parallel import rules as rules_lib

TrainState = dict  # {"step": int32[], "params": tree, "opt_state": tree, "rng": uint32[2]}


def _path_key(path) -> tuple:
    return tuple(str(getattr(p, "key", getattr(p, "name", getattr(p, "idx", p)))) for p in path)


def _opt_state_specs(abstract_opt_state, param_specs, abstract_params) -> Any:
    """Optimizer-state leaves that mirror a param (Adam's mu/nu, ...) take that param's spec;
    the rest (counts, scalars) are replicated. Matching is by the longest param-path suffix."""
    by_path = {}
    for (path, spec), leaf in zip(
        jax.tree_util.tree_flatten_with_path(param_specs, is_leaf=lambda x: isinstance(x, PartitionSpec))[0],
        jax.tree.leaves(abstract_params),
        strict=True,
    ):
        by_path[_path_key(path)] = (spec, leaf.shape)

    def spec_for(path, leaf):
        key = _path_key(path)
        for start in range(len(key)):
            hit = by_path.get(key[start:])
            if hit is not None and hit[1] == leaf.shape:
                return hit[0]
        return PartitionSpec()

    return jax.tree_util.tree_map_with_path(spec_for, abstract_opt_state)


def state_shardings(
    init_params: Callable[[jax.Array], Any], tx: optax.GradientTransformation, param_rng: jax.Array,
    mesh: Mesh, rules,
) -> TrainState:
    """The train state's shardings, from abstract shapes only (jax.eval_shape of init; nothing allocated)."""
    boxed = jax.eval_shape(init_params, param_rng)
    param_specs = rules_lib.logical_to_mesh_specs(boxed, mesh, rules)
    abstract_params = nn.meta.unbox(boxed)
    abstract_opt = jax.eval_shape(tx.init, abstract_params)
    specs = {
        "step": PartitionSpec(),
        "params": param_specs,
        "opt_state": _opt_state_specs(abstract_opt, param_specs, abstract_params),
        "rng": PartitionSpec(),
    }
    return rules_lib.specs_to_shardings(specs, mesh)


def abstract_sharded_state(
    init_params: Callable[[jax.Array], Any], tx: optax.GradientTransformation, rng: jax.Array,
    mesh: Mesh, rules,
) -> tuple[TrainState, TrainState]:
    """(state as ShapeDtypeStructs with shardings, state_shardings): what `create_sharded_state` would make,
    for ahead-of-time lowering without allocating it (`python -m medjax.bench memory`)."""
    param_rng, state_rng = jax.random.split(rng)
    shardings = state_shardings(init_params, tx, param_rng, mesh, rules)

    def init_state(prng):
        params = nn.meta.unbox(init_params(prng))
        return {"step": jnp.zeros((), jnp.int32), "params": params, "opt_state": tx.init(params), "rng": state_rng}

    return abstract_state(shardings, jax.eval_shape(init_state, param_rng)), shardings


def create_sharded_state(
    init_params: Callable[[jax.Array], Any], tx: optax.GradientTransformation, rng: jax.Array,
    mesh: Mesh, rules,
) -> tuple[TrainState, TrainState]:
    """(state, state_shardings); `init_params(rng)` returns boxed (logically partitioned) params."""
    param_rng, state_rng = jax.random.split(rng)
    shardings = state_shardings(init_params, tx, param_rng, mesh, rules)

    def init_state(prng):
        params = nn.meta.unbox(init_params(prng))
        return {"step": jnp.zeros((), jnp.int32), "params": params, "opt_state": tx.init(params), "rng": state_rng}

    # No mesh context here: flax would constrain DenseGeneral's flattened init kernel with its
    # unflattened logical names. out_shardings alone places every leaf.
    lowered = jax.jit(init_state, out_shardings=shardings).lower(param_rng)
    count = sum(math.prod(x.shape) for x in jax.tree.leaves(lowered.out_info["params"]))
    state = lowered.compile(init_compiler_options(count))(param_rng)
    return state, shardings


FAST_INIT_MAX_PARAMS = 300_000_000  # above this, init's run time at LLVM -O0 would outweigh its compile time


def init_compiler_options(param_count: int, backend: str | None = None) -> dict:
    """XLA options for the jitted init on `backend` (default: JAX's): on CPU, for models up to
    FAST_INIT_MAX_PARAMS params, LLVM -O0 (`xla_backend_optimization_level=0`). Init is random draws, one
    threefry + (truncated-)normal fusion per param, whose codegen XLA:CPU optimizes one kernel at a time:
    the CLIP-Driven Universal Model's init (Swin UNETR, feature 12, 32^3) compiles in 12 CPU s instead of
    80 for 0.5 s of run time instead of 0.05, and the same numbers (README "Benchmarks"). Elsewhere: {}."""
    if (backend or jax.default_backend()) != "cpu" or param_count > FAST_INIT_MAX_PARAMS:
        return {}
    return {"xla_backend_optimization_level": 0}


def abstract_state(state_shardings: TrainState, state: TrainState) -> TrainState:
    """ShapeDtypeStructs with shardings, the restore target for Orbax."""
    return jax.tree.map(
        lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s), state, state_shardings,
    )


def place_params(params: Any, param_shardings: Any) -> Any:
    """Host arrays -> global arrays with the given shardings."""
    return jax.tree.map(lambda x, s: jax.device_put(jnp.asarray(x), s), params, param_shardings)
