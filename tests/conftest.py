"""Test session set-up: 8 fake CPU devices for sharding tests (must precede the first jax import)."""
import os

os.environ.setdefault("JAX_PLATFORMS", "cpu")
flags = os.environ.get("XLA_FLAGS", "")
if "xla_force_host_platform_device_count" not in flags:
    os.environ["XLA_FLAGS"] = (flags + " --xla_force_host_platform_device_count=8").strip()

import pytest  # noqa: E402


@pytest.fixture(scope="session")
def fundus_demo(tmp_path_factory):
    """A small fundus + genotype demo dataset in the real formats (PNG, CSV, PLINK), made once."""
    from medjax.data.demo_fundus_genome import make_fundus_genome_demo

    root = tmp_path_factory.mktemp("fundus_demo")
    make_fundus_genome_demo(str(root), participants=24, image_size=48, num_snps=200, seed=0)
    return str(root)
