import os
from types import SimpleNamespace

from medjax import config as config_lib
from medjax.bench.step import work_unit
from medjax.tasks import build_task


def test_work_unit_reads_what_the_task_declares():
    assert work_unit(SimpleNamespace(work_per_example=lambda: (5, "tokens"))) == ("tokens", 5)
    assert work_unit(SimpleNamespace(work_per_example=lambda: (96 ** 3, "voxels"))) == ("voxels", 96 ** 3)
    assert work_unit(SimpleNamespace(work_per_example=lambda: None)) is None


def test_timed_batches_share_the_first_batch_shape():
    """With length buckets the bench times one compiled step: the batches of the first batch's bucket."""
    import numpy as np

    from medjax.bench.step import batches_of_one_shape

    lengths = [96, 128, 96, 128, 128, 96, 96]
    batches = iter([{"input_ids": np.full((2, n), i)} for i, n in enumerate(lengths)])
    taken = batches_of_one_shape(batches, 3)
    assert [int(b["input_ids"][0, 0]) for b in taken] == [0, 2, 5]
    assert [b["x"].shape for b in batches_of_one_shape(iter([{"x": np.zeros((1, 4))}]), 3)] == [(1, 4)]  # ran out


def test_task_token_counts(fundus_demo):
    mrm = build_task(config_lib.get_config("mrm_retina", "tiny", [f"data.dir={fundus_demo}"]), log=lambda *_: None)
    assert mrm.dataset.num_snps == 22  # 200 demo SNPs on 22 chromosomes (9-10 each), every 10th within each (ContIG)
    assert mrm.work_per_example() == (16 + 1 + 2, "tokens")  # (32/8)^2 patches, class token, ceil(22/16) genome tokens
    assert mrm.work_in_batch({}) == 19 * mrm.global_batch  # the default: per-example work times the rows
    aptos = build_task(config_lib.get_config("mrm_aptos", "tiny", [f"data.dir={os.path.join(fundus_demo, 'aptos')}"]),
                       log=lambda *_: None)
    assert aptos.work_per_example() == (17, "tokens")


def test_aot_only_plans_a_sharded_step_without_allocating(demo_roots, capsys):
    """`bench step --aot-only --mesh fsdp=4,tensor=2` on 8 host devices: the tiny PathChat (Llama) step is compiled
    from abstract shapes for a (1, 4, 2) mesh with the fsdp_tp rules; the row gives the param count and XLA's
    per-device plan; no param-sized array is created."""
    import flax.linen as nn
    import jax
    import numpy as np

    from medjax.bench import step

    assert step.mesh_overrides("fsdp=4,tensor=2", []) == ["mesh.data=1", "mesh.fsdp=4", "mesh.tensor=2",
                                                          "mesh.rules=fsdp_tp"]
    assert step.mesh_overrides("fsdp=8", ["mesh.rules=fsdp"]) == ["mesh.data=1", "mesh.fsdp=8", "mesh.tensor=1"]
    demo = demo_roots("pathology_chat")
    overrides = [f"data.dir={demo}", "data.max_length=16", "model.depth=1", "train.batch_size=8"]
    task = build_task(config_lib.get_config("pathchat_stage2", "tiny", overrides), log=lambda *_: None)
    params = sum(int(np.prod(x.shape)) for x in jax.tree.leaves(nn.unbox(jax.eval_shape(task.init_params,
                                                                                        jax.random.key(0)))))
    before = {id(a) for a in jax.live_arrays()}
    step.main(["--exp", "pathchat_stage2", "--variant", "tiny", "--aot-only", "--mesh", "fsdp=4,tensor=2",
               *[arg for o in overrides for arg in ("--set", o)]])
    created = sum(a.nbytes for a in jax.live_arrays() if id(a) not in before)
    assert created < 1024 < 4 * params  # at most a PRNG key; the params alone would be 4 bytes each
    row = [line for line in capsys.readouterr().out.splitlines() if line.startswith("| pathchat_stage2 | tiny")]
    cells = [c.strip() for c in row[0].strip("|").split("|")]
    assert cells[3] == "data=1 fsdp=4 tensor=2 (8 x cpu)" and cells[4] == f"{params / 1e6:.2f}M" and cells[5] == "8"
    argument, output, temp, both = (float(c.replace(",", "")) for c in cells[8:12])
    assert argument > 0 and temp > 0 and abs(both - (argument + temp)) < 0.2
    # each device holds about 1/8 of params + 2 Adam moments (fp32), and a share of the batch
    assert argument < 3 * 4 * params / 2**20


def test_a_step_too_big_for_the_device_is_not_allocated(demo_roots, monkeypatch):
    """`bench step` refuses, with the needed and available memory and the --aot-only command, a config whose
    params + optimizer state alone exceed one device's memory (a paper-size step on a small host)."""
    import jax

    from medjax.bench import memory, step

    config = config_lib.get_config("pathchat_stage2", "tiny", [f"data.dir={demo_roots('pathology_chat')}",
                                                               "mesh.num_devices=1"])
    said = []
    say = lambda text, **_: said.append(text)  # noqa: E731
    params, need = memory.state_bytes_per_device(config)
    assert 8 * params < need < 12 * params + 1024  # fp32 params + two Adam moments (none for the frozen vision tower)
    monkeypatch.setattr(memory, "available_bytes_per_device", lambda device: need + 1)
    assert step.fits("pathchat_stage2", config, jax.devices()[0], say) and not said
    monkeypatch.setattr(memory, "available_bytes_per_device", lambda device: need - 1)
    assert not step.fits("pathchat_stage2", config, jax.devices()[0], say)
    assert "not run" in said[0] and "--aot-only" in said[0]
