"""Test session set-up: 8 fake CPU devices for sharding tests (must precede the first jax import)."""
import os

os.environ.setdefault("JAX_PLATFORMS", "cpu")
flags = os.environ.get("XLA_FLAGS", "")
if "xla_force_host_platform_device_count" not in flags:
    flags = (flags + " --xla_force_host_platform_device_count=8").strip()
# Tiny models: compile time dominates, so skip LLVM's backend optimisations (about 2x faster compiles).
if "xla_backend_optimization_level" not in flags:
    flags += " --xla_backend_optimization_level=0"
# XLA:CPU's MLIR fusion emitters (one MLIR pipeline per fusion) spend most of a tiny model's compile; the
# classic LLVM IR emitters compile the same fusions about 2x faster (mrm_retina tiny value_and_grad: 8.5 -> 4.3
# CPU s, results equal to ~1e-7).
if "xla_cpu_use_fusion_emitters" not in flags:
    flags += " --xla_cpu_use_fusion_emitters=false"
os.environ["XLA_FLAGS"] = flags
# Trainers built with the same config compile the same step: share compiled executables across
# tests (and the subprocesses they start) through JAX's persistent compilation cache. One directory per
# session (xdist workers and subprocesses inherit it), removed when the session's first process exits.
if "JAX_COMPILATION_CACHE_DIR" not in os.environ:
    import atexit
    import shutil
    import tempfile

    os.environ["JAX_COMPILATION_CACHE_DIR"] = tempfile.mkdtemp(prefix="medjax-jax-cache-")
    atexit.register(shutil.rmtree, os.environ["JAX_COMPILATION_CACHE_DIR"], ignore_errors=True)
os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS", "0")
os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES", "0")

import pytest  # noqa: E402


@pytest.fixture(scope="session")
def fundus_demo(tmp_path_factory):
    """A small fundus + genotype demo dataset in the real formats (PNG, CSV, PLINK), made once."""
    from medjax.data.demo.fundus_genome import make_fundus_genome_demo

    root = tmp_path_factory.mktemp("fundus_demo")
    make_fundus_genome_demo(str(root), participants=24, image_size=48, num_snps=200, seed=0)
    return str(root)


@pytest.fixture(scope="session")
def demo_roots(tmp_path_factory, fundus_demo):
    """kind -> a small demo dataset of that kind in the real formats (tests/experiment_data.py), each made
    once, on first use."""
    from tests.experiment_data import make_test_demo

    made = {"fundus_genome": fundus_demo}

    def root(kind: str) -> str:
        if kind not in made:
            made[kind] = make_test_demo(kind, str(tmp_path_factory.mktemp(f"{kind}_demo")))
        return made[kind]

    return root
