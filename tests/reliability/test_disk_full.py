"""A full disk (issue #15: 145-502 tracebacks) is one DiskFullError naming the file, the step and the last
complete checkpoint, which is left intact and restorable."""
import errno
import os

import pytest

from medjax import metric_writer
from medjax.checkpoint import restore_params
from medjax.checkpoint_integrity import verify_checksums
from medjax.disk_full import DiskFullError
from medjax.trainer import Trainer
from tests.toy_task import ToyTask, toy_config


def _enospc(path):
    return OSError(errno.ENOSPC, "No space left on device", path)


@pytest.mark.parametrize("writer", ["checkpoint", "metrics"])
def test_enospc_is_one_line_and_earlier_checkpoints_stay(tmp_path, monkeypatch, writer):
    config = toy_config(steps=6, checkpoint_every=2)
    config.mesh.num_devices = 1
    trainer = Trainer(config, ToyTask(config), str(tmp_path))
    bad = str(tmp_path / ("checkpoints/4/state" if writer == "checkpoint" else "metrics.jsonl"))
    if writer == "checkpoint":
        save = trainer.checkpointer.manager.save

        def full_at_step_4(step, *args, **kwargs):
            if step == 4:
                raise RuntimeError("save failed") from _enospc(bad)  # wrapped, as Orbax re-raises
            return save(step, *args, **kwargs)

        monkeypatch.setattr(trainer.checkpointer.manager, "save", full_at_step_4)
    else:
        write = metric_writer.MetricWriter.write

        def full_at_step_3(self, step, metrics):
            if step == 3:
                raise _enospc(bad)
            return write(self, step, metrics)

        monkeypatch.setattr(metric_writer.MetricWriter, "write", full_at_step_3)
    with pytest.raises(DiskFullError) as error:
        trainer.run()
    message = str(error.value)
    assert "\n" not in message
    step = 4 if writer == "checkpoint" else 3
    assert message.startswith(f"no space left on device writing {bad} at step {step}; the last complete "
                              f"checkpoint is step 2 in {tmp_path}/checkpoints"), message
    assert verify_checksums(os.path.join(tmp_path, "checkpoints", "2")) is None
    assert restore_params(str(tmp_path))  # the earlier checkpoint restores
    assert not (tmp_path / "medjax.lock").exists()  # the lock is released on the way out
