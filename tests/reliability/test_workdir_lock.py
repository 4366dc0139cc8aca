"""Two runs on one --workdir (issue #15: both crashed inside Orbax): the second refuses at once naming the
holder's host and pid, writing nothing; a stale lock (a dead pid on this host) is taken over with a warning."""
import json
import os
import socket
import subprocess
import sys

import pytest

from medjax.trainer import Trainer
from medjax.workdir_lock import LOCK_NAME, WorkdirLock, WorkdirLockedError
from tests.toy_task import ToyTask, toy_config


def _lock_file(workdir, host, pid):
    os.makedirs(workdir, exist_ok=True)
    with open(os.path.join(workdir, LOCK_NAME), "w") as f:
        json.dump({"host": host, "pid": pid, "since": "2026-01-01 00:00:00"}, f)


def _dead_pid():
    proc = subprocess.Popen([sys.executable, "-c", "pass"])
    proc.wait()
    return proc.pid


def test_a_second_run_refuses_at_once_naming_the_holder(tmp_path):
    holder = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        _lock_file(tmp_path, socket.gethostname(), holder.pid)
        config = toy_config(steps=2)
        config.mesh.num_devices = 1
        trainer = Trainer(config, ToyTask(config), str(tmp_path))
        with pytest.raises(WorkdirLockedError, match=f"in use by another run: pid {holder.pid} on host "
                                                     f"{socket.gethostname()}"):
            trainer.run()
    finally:
        holder.kill()
        holder.wait()
    assert not (tmp_path / "metrics.jsonl").exists() and not (tmp_path / "config.json").exists()
    assert trainer.checkpointer.latest_step() is None


def test_a_lock_held_on_another_host_is_respected(tmp_path):
    _lock_file(tmp_path, "some-other-host", 1)
    with pytest.raises(WorkdirLockedError, match="pid 1 on host some-other-host"):
        WorkdirLock(str(tmp_path)).acquire()


def test_a_stale_lock_is_taken_over_with_a_warning_and_released_after(tmp_path):
    pid = _dead_pid()
    _lock_file(tmp_path, socket.gethostname(), pid)
    with pytest.warns(UserWarning, match=f"taking over a stale lock of pid {pid}"):
        lock = WorkdirLock(str(tmp_path)).acquire()
    with open(tmp_path / LOCK_NAME) as f:
        assert json.load(f)["pid"] == os.getpid()
    with pytest.raises(WorkdirLockedError, match=f"pid {os.getpid()}"):  # held: a second taker refuses
        WorkdirLock(str(tmp_path)).acquire()
    lock.release()
    assert not (tmp_path / LOCK_NAME).exists()
