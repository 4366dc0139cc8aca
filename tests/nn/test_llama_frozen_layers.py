"""Llama.frozen_layers: a frozen scanned bf16 stack is sliced as raw bits inside the scan (medjax/nn/llama.py
`frozen_stack_bits`): the same params, the same logits bit for bit, no gradient to the layers, and no float32
copy of the whole stack in the compiled program (XLA:CPU converted the bf16 stack whole before the scan)."""
import re

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from medjax.nn.llama import Llama

SIZES = dict(vocab_size=64, width=64, depth=4, num_heads=4, mlp_dim=512, scan=True, remat="full",
             dtype=jnp.bfloat16, param_dtype=jnp.bfloat16)
STACK = re.compile(r"= f32\[4,(?:64,512|512,64)\]\S* (?:fusion|convert|copy)\(")


def test_frozen_layers_same_logits_no_gradient_no_float32_stack():
    plain, frozen = Llama(**SIZES), Llama(**SIZES, frozen_layers=True)
    ids = jax.random.randint(jax.random.key(1), (2, 16), 0, 64)
    params = nn.unbox(plain.init(jax.random.key(0), ids)["params"])
    frozen_params = nn.unbox(frozen.init(jax.random.key(0), ids)["params"])
    assert jax.tree.structure(params) == jax.tree.structure(frozen_params)
    for a, b in zip(jax.tree.leaves(params), jax.tree.leaves(frozen_params)):
        assert a.dtype == b.dtype == jnp.bfloat16
        np.testing.assert_array_equal(np.asarray(a, np.float32), np.asarray(b, np.float32))  # the same init

    def loss(model):
        return lambda p: jnp.mean(model.apply({"params": p}, ids) ** 2)

    np.testing.assert_array_equal(plain.apply({"params": params}, ids), frozen.apply({"params": params}, ids))
    compiled = {name: jax.jit(jax.grad(loss(model))).lower(params).compile()
                for name, model in (("plain", plain), ("frozen", frozen))}
    grads = compiled["frozen"](params)
    assert all(not np.asarray(g, np.float32).any() for g in jax.tree.leaves(grads["layers"]))
    assert np.asarray(grads["embed_tokens"]["embedding"], np.float32).any()  # the rest still trains
    assert np.asarray(compiled["plain"](params)["layers"]["mlp"]["up_proj"]["kernel"], np.float32).any()
    assert STACK.search(compiled["plain"].as_text()), "XLA:CPU no longer converts the bf16 stack whole"
    assert not STACK.search(compiled["frozen"].as_text())
