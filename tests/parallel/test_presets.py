"""Sharding presets on 8 fake CPU devices: one experiment per model family (its tiny model) under
`dp`, `fsdp` and `fsdp_tp` (mesh data=2, fsdp=2, tensor=2) gives the single-device training loss,
and every experiment's parameter partition specs match the golden snapshot.

Regenerate the snapshot after an intended change of a model's params or of the rules table:

    python -m tests.parallel.test_presets --regenerate
"""
import json
import os
import sys

if __name__ == "__main__":  # before the first jax import, as tests/conftest.py does
    os.environ.setdefault("JAX_PLATFORMS", "cpu")
    os.environ["XLA_FLAGS"] = os.environ.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=8"

import flax.linen as nn
import jax
import numpy as np
import pytest
from jax.sharding import PartitionSpec

from medjax import config as config_lib
from medjax.parallel import mesh as mesh_lib
from medjax.parallel import rules as rules_lib
from medjax.tasks import build_task, task_class
from medjax.tasks.base import TaskBase
from medjax.trainer import global_batch
from tests.experiment_data import make_test_demo, tiny_data_overrides

GOLDEN = os.path.join(os.path.dirname(os.path.abspath(__file__)), "golden_partition_specs.json")
MESH = dict(data=2, fsdp=2, tensor=2, rules="fsdp", num_devices=0)
PRESETS = sorted(rules_lib.PRESETS)
EXPERIMENTS = config_lib.available_experiments()


def _family(task_name: str) -> type:
    """A task's model family: the direct TaskBase subclass it derives from (PTUnifier's fine-tuning tasks
    share PTUnifierFinetuneTask)."""
    return next(c for c in task_class(task_name).__mro__ if TaskBase in c.__bases__)


def _one_per_family() -> list[str]:
    """The first experiment of each model family: the loss-equality cases compile 3 programs each (dp for one family only)."""
    first = {}
    for exp in EXPERIMENTS:
        first.setdefault(_family(config_lib.get_config(exp, "tiny").task), exp)
    return sorted(first.values())


FAMILIES = _one_per_family()


def tiny_config(exp: str, root, tmp_dir: str, extra: tuple[str, ...] = ()):
    base = config_lib.get_config(exp, "tiny")
    return config_lib.get_config(exp, "tiny", [*tiny_data_overrides(base, root, tmp_dir), "kernels.impl=reference",
                                               *extra])


def _path(path) -> str:
    return "/".join(str(getattr(p, "key", p)) for p in path)


def _text(spec) -> str:
    """A spec as a Python tuple literal: "('fsdp', ('data', 'tensor'), None)"."""
    return repr(tuple(tuple(a) if isinstance(a, (tuple, list)) else a for a in spec))


def mesh_specs(boxed, mesh, preset: str) -> dict[str, PartitionSpec]:
    specs = rules_lib.logical_to_mesh_specs(boxed, mesh, rules_lib.logical_rules(preset))
    leaves = jax.tree_util.tree_flatten_with_path(specs, is_leaf=lambda x: isinstance(x, PartitionSpec))[0]
    return {_path(p): s for p, s in leaves}


def partition_snapshot(boxed, mesh) -> dict:
    """{"logical": {param: axis names}, PRESET: {param: mesh spec}} for one model's boxed param shapes, as text."""
    logical = jax.tree_util.tree_flatten_with_path(
        nn.get_partition_spec(boxed), is_leaf=lambda x: isinstance(x, PartitionSpec))[0]
    snapshot = {"logical": {_path(p): _text(s) for p, s in logical}}
    for preset in PRESETS:
        snapshot[preset] = {path: _text(spec) for path, spec in mesh_specs(boxed, mesh, preset).items()}
    return snapshot


_TASKS: dict = {}
_BOXED: dict = {}


def tiny_task(exp: str, root, tmp_dir: str):
    """An experiment's tiny task on the test demo, built once per session (every test here reads, none writes)."""
    if exp not in _TASKS:
        _TASKS[exp] = build_task(tiny_config(exp, root, tmp_dir), log=lambda *_: None)
    return _TASKS[exp]


def boxed_shapes(exp: str, root, tmp_dir: str):
    """The experiment's params as boxed ShapeDtypeStructs (logical axes kept), traced once per session."""
    if exp not in _BOXED:
        _BOXED[exp] = jax.eval_shape(tiny_task(exp, root, tmp_dir).init_params, jax.random.PRNGKey(0))
    return _BOXED[exp]


def all_snapshots(root, tmp_dir: str) -> dict:
    mesh = mesh_lib.make_mesh(MESH)
    return {exp: partition_snapshot(boxed_shapes(exp, root, tmp_dir), mesh) for exp in EXPERIMENTS}


# Compile-time savers for CPU tests; the compared values do not depend on them.
FAST_COMPILE = {"xla_backend_optimization_level": 0, "xla_llvm_disable_expensive_passes": True}


# The loss cases' smaller models where the tiny one compiles longest: the sharded loss equals the single-device
# one at any depth (PTUnifier's 2 co-attention blocks -> 1: its 3 loss compiles ~52 -> ~26 CPU s). The golden
# and sharding tests keep the tiny configs.
LOSS_OVERRIDES = {"ptunifier": ("model.fusion_layers=1",), "ptunifier_cls": ("model.fusion_layers=1",)}


class _Model:
    """One experiment's task, random params and first global batch, shared by its preset cases."""

    def __init__(self, exp: str, root, tmp_dir: str):
        if exp in LOSS_OVERRIDES:
            self.task = build_task(tiny_config(exp, root, tmp_dir, LOSS_OVERRIDES[exp]), log=lambda *_: None)
            self.boxed = jax.eval_shape(self.task.init_params, jax.random.PRNGKey(0))
        else:
            self.task = tiny_task(exp, root, tmp_dir)
            self.boxed = boxed_shapes(exp, root, tmp_dir)
        # Any params give a sharding-equivalence test; seeded normals spare compiling the initialisers.
        rng = np.random.default_rng(0)
        self.params = jax.tree.map(lambda s: (0.1 * rng.standard_normal(s.shape)).astype(s.dtype),
                                   nn.meta.unbox(self.boxed))
        self.batch = next(iter(self.task.train_data()))
        self.rng = jax.random.PRNGKey(1)

    def loss(self, mesh, rules) -> float:
        """The task's training loss (dropout on), params and batch sharded as the trainer shards them."""
        param_shardings = rules_lib.specs_to_shardings(rules_lib.logical_to_mesh_specs(self.boxed, mesh, rules), mesh)
        params = jax.device_put(self.params, param_shardings)
        batch = global_batch(self.batch, mesh_lib.batch_sharding(mesh), 1)
        loss_fn = jax.jit(lambda p, b: self.task.loss_fn(p, b, self.rng, True)[0],
                          in_shardings=(param_shardings, mesh_lib.batch_sharding(mesh)))
        with jax.set_mesh(mesh), nn.logical_axis_rules(rules):
            compiled = loss_fn.lower(params, batch).compile(FAST_COMPILE)
            return float(compiled(params, batch))


_MODELS: dict = {}
_SINGLE_DEVICE_LOSS: dict = {}


def _model(exp: str, root, tmp_dir: str) -> _Model:
    if exp not in _MODELS:
        _MODELS[exp] = _Model(exp, root, tmp_dir)
    return _MODELS[exp]


def _single_device_loss(exp: str, root, tmp_dir: str) -> float:
    if exp not in _SINGLE_DEVICE_LOSS:
        mesh = mesh_lib.make_mesh(dict(MESH, data=1, fsdp=1, tensor=1, num_devices=1))
        _SINGLE_DEVICE_LOSS[exp] = _model(exp, root, tmp_dir).loss(mesh, rules_lib.logical_rules("dp"))
    return _SINGLE_DEVICE_LOSS[exp]


@pytest.fixture(scope="module")
def scratch(tmp_path_factory):
    return str(tmp_path_factory.mktemp("presets"))


# Every family under the presets that shard params (fsdp, fsdp_tp: their batch sharding is dp's too); dp itself,
# which only replicates params, for one family: a dp case per family cost a compile each (~70 CPU s in all) and
# checked nothing fsdp's cases do not, while the golden test still pins every preset's specs for every experiment.
DP_FAMILY = "mrm_retina" if "mrm_retina" in FAMILIES else FAMILIES[0]
PRESET_CASES = [(exp, preset) for exp in FAMILIES for preset in PRESETS if preset != "dp"] + [(DP_FAMILY, "dp")]


@pytest.mark.parametrize("exp,preset", PRESET_CASES)
def test_preset_matches_single_device(exp, preset, demo_roots, scratch):
    assert jax.device_count() == 8
    want = _single_device_loss(exp, demo_roots, scratch)
    got = _model(exp, demo_roots, scratch).loss(mesh_lib.make_mesh(MESH), rules_lib.logical_rules(preset))
    assert np.isfinite(want) and want > 0
    np.testing.assert_allclose(got, want, rtol=2e-5)


def test_presets_shard_the_params(demo_roots, scratch):
    """dp replicates every param; fsdp splits them over `fsdp`; fsdp_tp adds `tensor` (heads, MLP) where
    the model has attention heads or MLPs."""
    mesh = mesh_lib.make_mesh(MESH)
    for exp in EXPERIMENTS:
        boxed = boxed_shapes(exp, demo_roots, scratch)
        used = {}
        for preset in PRESETS:
            specs = mesh_specs(boxed, mesh, preset).values()
            used[preset] = {name for spec in specs for entry in spec
                            for name in ((entry,) if isinstance(entry, str) else entry or ())}
        logical = {name for spec in jax.tree.leaves(nn.get_partition_spec(boxed),
                                                   is_leaf=lambda x: isinstance(x, PartitionSpec))
                   for name in spec if isinstance(name, str)}
        tensor = {"tensor"} if logical & {"heads", "mlp"} else set()  # a pure conv net (UNet3D) has neither
        assert used == {"dp": set(), "fsdp": {"fsdp"}, "fsdp_tp": {"fsdp"} | tensor}, exp


def test_partition_specs_match_golden(demo_roots, scratch):
    with open(GOLDEN) as f:
        golden = json.load(f)
    current = all_snapshots(demo_roots, scratch)
    differences = []
    for exp in sorted(set(golden) | set(current)):
        for table in sorted(set(golden.get(exp, {})) | set(current.get(exp, {}))):
            want, got = golden.get(exp, {}).get(table, {}), current.get(exp, {}).get(table, {})
            for param in sorted(set(want) | set(got)):
                if want.get(param, "absent") != got.get(param, "absent"):
                    differences.append(f"{exp} {table} {param}: golden {want.get(param, 'absent')}, "
                                       f"now {got.get(param, 'absent')}")
    assert not differences, (
        f"{len(differences)} parameter partition specs changed:\n  " + "\n  ".join(differences[:20]) +
        "\nIf intended: python -m tests.parallel.test_presets --regenerate")


def test_mfu_uses_the_per_device_flops_of_the_sharded_program():
    """XLA's cost analysis of a partitioned program counts one device's share; MFU divides by one
    device's peak (medjax/parallel/peaks.py)."""
    from medjax.bench.step import flops_per_step, settings_to_compare
    from medjax.parallel import peaks

    mesh = mesh_lib.make_mesh(MESH)
    a, b = np.ones((64, 32), np.float32), np.ones((32, 16), np.float32)
    one = jax.jit(lambda x, y: x @ y).lower(a, b).compile()
    split = jax.jit(lambda x, y: x @ y, in_shardings=(mesh_lib.batch_sharding(mesh), mesh_lib.replicated(mesh)))
    assert flops_per_step(one) == 2 * 64 * 32 * 16
    assert flops_per_step(split.lower(a, b).compile()) == 2 * 64 * 32 * 16 / 4  # data x fsdp = 4 shards
    h100 = peaks.peak_flops("NVIDIA H100 80GB HBM3", "bfloat16")
    assert h100 == 989.4e12 and peaks.peak_flops("NVIDIA H100 80GB HBM3", "float32") == 494.7e12
    assert peaks.mfu(989.4e12 * 0.5, 1.0, h100) == pytest.approx(0.5)
    assert peaks.device_peak("TPU v5 lite").bf16 == 197e12 and peaks.device_peak("TPU v5").bf16 == 459e12
    assert peaks.device_peak("NVIDIA A10G") is None and peaks.device_peak("cpu") is None
    assert peaks.mfu(1e9, 1.0, None) is None
    assert settings_to_compare(["dtype=float32,bfloat16", "mesh.rules=dp,fsdp"]) == [
        ["dtype=float32", "mesh.rules=dp"], ["dtype=float32", "mesh.rules=fsdp"],
        ["dtype=bfloat16", "mesh.rules=dp"], ["dtype=bfloat16", "mesh.rules=fsdp"]]


def regenerate() -> None:
    """Rewrite the golden file from the test demos (tests/experiment_data.py, as tests/conftest.py makes them)."""
    import tempfile

    with tempfile.TemporaryDirectory() as tmp:
        made = {}

        def root(kind: str) -> str:
            if kind not in made:
                made[kind] = make_test_demo(kind, os.path.join(tmp, kind))
            return made[kind]

        snapshot = all_snapshots(root, tmp)
    with open(GOLDEN, "w") as f:
        json.dump(snapshot, f, indent=1, sort_keys=True)
        f.write("\n")
    counts = ", ".join(f"{exp} ({len(tables['logical'])} params)" for exp, tables in snapshot.items())
    print(f"wrote {GOLDEN}: {counts}")


if __name__ == "__main__":
    if sys.argv[1:] != ["--regenerate"]:
        sys.exit(__doc__)
    regenerate()
