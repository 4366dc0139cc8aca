"""Train-state creation: init's XLA options (LLVM -O0 for the random draws of models that are not huge, on
CPU only) and that the state is the one init describes."""
import jax
import jax.numpy as jnp
import numpy as np
import optax

from medjax.parallel import mesh as mesh_lib
from medjax.train_state import FAST_INIT_MAX_PARAMS, create_sharded_state, init_compiler_options


def test_init_options_are_fast_compile_on_cpu_for_models_that_are_not_huge():
    assert init_compiler_options(62_000_000, "cpu") == {"xla_backend_optimization_level": 0}
    assert init_compiler_options(FAST_INIT_MAX_PARAMS + 1, "cpu") == {}  # a 7B init would run for minutes at -O0
    assert init_compiler_options(1000, "gpu") == {} and init_compiler_options(1000, "tpu") == {}


def test_sharded_state_holds_the_init_numbers():
    def init_params(rng):
        a, b = jax.random.split(rng)
        return {"w": jax.random.truncated_normal(a, -2.0, 2.0, (64, 32)) * 0.02, "b": jax.random.normal(b, (32,))}

    mesh = mesh_lib.make_mesh({"data": -1, "fsdp": 1, "tensor": 1})
    rng = jax.random.PRNGKey(7)
    state, shardings = create_sharded_state(init_params, optax.adam(1e-3), rng, mesh, [])
    expected = init_params(jax.random.split(rng)[0])  # create_sharded_state's param_rng
    for key in ("w", "b"):
        np.testing.assert_allclose(np.asarray(state["params"][key]), np.asarray(expected[key]), rtol=1e-6, atol=1e-7)
    assert int(state["step"]) == 0 and jnp.all(state["opt_state"][0].mu["w"] == 0)
    assert set(shardings) == {"step", "params", "opt_state", "rng"}
