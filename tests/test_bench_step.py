import os
from types import SimpleNamespace

from medjax import config as config_lib
from medjax.bench.step import work_unit
from medjax.tasks import build_task


def test_work_unit_reads_what_the_task_declares():
    assert work_unit(SimpleNamespace(work_per_example=lambda: (5, "tokens"))) == ("tokens", 5)
    assert work_unit(SimpleNamespace(work_per_example=lambda: (96 ** 3, "voxels"))) == ("voxels", 96 ** 3)
    assert work_unit(SimpleNamespace(work_per_example=lambda: None)) is None


def test_task_token_counts(fundus_demo):
    mrm = build_task(config_lib.get_config("mrm_retina", "tiny", [f"data.dir={fundus_demo}"]), log=lambda *_: None)
    assert mrm.dataset.num_snps == 22  # 200 demo SNPs on 22 chromosomes (9-10 each), every 10th within each (ContIG)
    assert mrm.work_per_example() == (16 + 1 + 2, "tokens")  # (32/8)^2 patches, class token, ceil(22/16) genome tokens
    aptos = build_task(config_lib.get_config("mrm_aptos", "tiny", [f"data.dir={os.path.join(fundus_demo, 'aptos')}"]),
                       log=lambda *_: None)
    assert aptos.work_per_example() == (17, "tokens")
