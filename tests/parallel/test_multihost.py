"""Multi-process runs: where the process layout comes from (flags, MEDJAX_*, SLURM, GKE JobSet, TPU
pod), the launch scripts' dry runs, and real 2-process training through launch/local.sh: the same
losses as one process, one collective checkpoint, exact resume, and a bounded, clear exit when a
process dies."""
import json
import os
import shlex
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time

import numpy as np
import pytest

from medjax.parallel import multihost, ports
from medjax.parallel.multihost import ProcessLayout, Timeouts, first_host, resolve
from medjax.parallel.ports import reserve_port

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
LOCAL = os.path.join(ROOT, "launch", "local.sh")
# Generous: these runs share 2 cores with compilations (and, in CI, other jobs); a live process that
# is starved of CPU for a few seconds must not be declared dead. A 5 s heartbeat did that (issue #22).
# A survivor of a killed process still exits within seconds, through its failed collective.
HEARTBEAT_S = 60


# ----------------------------------------------------------------------------- layout resolution
def test_nothing_configured_is_a_single_process_run():
    assert resolve(env={}) is None
    assert resolve(env={"SLURM_JOB_ID": "7", "SLURM_NTASKS": "4"}) is None  # salloc shell, no srun
    assert resolve(env={"SLURM_PROCID": "0", "SLURM_NTASKS": "1", "SLURM_JOB_NODELIST": "n1"}) is None


def test_flags_win_and_fill_from_medjax_env():
    env = {"MEDJAX_COORDINATOR": "other:1", "MEDJAX_NUM_PROCESSES": "4", "MEDJAX_PROCESS_ID": "3"}
    assert resolve("h:9", None, 1, env=env) == ProcessLayout("flags", "h:9", 4, 1)
    assert resolve(env=env) == ProcessLayout("MEDJAX_* environment", "other:1", 4, 3)


@pytest.mark.parametrize("flags, env, message", [
    (("h:1", None, None), {}, "--num-processes/MEDJAX_NUM_PROCESSES, --process-id/MEDJAX_PROCESS_ID"),
    (("h", 2, 0), {}, "coordinator 'h' from flags: expected HOST:PORT"),
    (("h:1", 2, 2), {}, "process id 2 from flags: expected 0 <= id < 2"),
    ((None, None, None), {"MEDJAX_COORDINATOR": "h:1", "MEDJAX_NUM_PROCESSES": "two", "MEDJAX_PROCESS_ID": "0"},
     "MEDJAX_NUM_PROCESSES='two': expected the number of processes"),
])
def test_bad_layouts_name_the_setting(flags, env, message):
    with pytest.raises(ValueError, match=message.replace("(", r"\(").replace(")", r"\)")):
        resolve(*flags, env=env)


@pytest.mark.parametrize("nodelist, host", [
    ("node001", "node001"), ("node001,host2", "node001"), ("gpu[003-007,010],cpu1", "gpu003"),
    ("gpu[010,003]", "gpu010"), ("a[1-2]-ib[5-6],b7", "a1-ib5"),
])
def test_first_host_of_a_slurm_nodelist(nodelist, host):
    assert first_host(nodelist) == host


def test_slurm_layout():
    env = {"SLURM_JOB_ID": "4100", "SLURM_NTASKS": "16", "SLURM_PROCID": "9", "SLURM_LOCALID": "1",
           "SLURM_STEP_NODELIST": "gpu[07-08]", "SLURM_STEP_TASKS_PER_NODE": "8(x2)"}
    layout = resolve(env=env)
    assert layout == ProcessLayout("SLURM", f"gpu07:{4100 % 4096 + 61440}", 16, 9, (1,))
    one_per_node = dict(env, SLURM_STEP_TASKS_PER_NODE="1(x16)", MEDJAX_COORDINATOR_PORT="1234")
    assert resolve(env=one_per_node) == ProcessLayout("SLURM", "gpu07:1234", 16, 9, None)
    gpu_bound = dict(env, CUDA_VISIBLE_DEVICES="1")  # srun --gpus-per-task=1 already binds one GPU
    assert resolve(env=gpu_bound).local_device_ids is None


def test_gke_jobset_layout():
    env = {"JOBSET_NAME": "mrm", "REPLICATED_JOB_NAME": "workers", "JOB_INDEX": "0",
           "JOB_COMPLETION_INDEX": "3", "MEDJAX_NUM_PROCESSES": "4"}
    assert resolve(env=env) == ProcessLayout("GKE JobSet", "mrm-workers-0-0.mrm:8476", 4, 3)
    second_job = dict(env, JOB_INDEX="1", MEDJAX_PROCESSES_PER_JOB="2", MEDJAX_NUM_PROCESSES="4",
                      JOB_COMPLETION_INDEX="1", MEDJAX_COORDINATOR_PORT="9000")
    assert resolve(env=second_job) == ProcessLayout("GKE JobSet", "mrm-workers-0-0.mrm:9000", 4, 3)
    with pytest.raises(ValueError, match="set MEDJAX_NUM_PROCESSES"):
        resolve(env={k: v for k, v in env.items() if k != "MEDJAX_NUM_PROCESSES"})


def test_tpu_pod_is_left_to_jax():
    auto = ProcessLayout("TPU pod (detected by JAX)", None, None, None)
    assert resolve(env={"MEDJAX_DISTRIBUTED": "auto"}) == auto
    assert resolve(env={"TPU_WORKER_HOSTNAMES": "t-0,t-1", "TPU_WORKER_ID": "1"}) == auto
    assert resolve(env={"TPU_WORKER_HOSTNAMES": "t-0", "TPU_WORKER_ID": "0"}) is None  # one host


def test_single_process_initialize_does_nothing():
    assert multihost.initialize(env={}) is None


# ----------------------------------------------------------------------------- timeouts and ports
@pytest.fixture
def recorded_jax_initialize(monkeypatch):
    """jax.distributed.initialize (and the gloo config switch) recorded instead of run."""
    import jax

    calls = []
    monkeypatch.setattr(jax.distributed, "initialize", lambda *args, **kwargs: calls.append((args, kwargs)))
    monkeypatch.setattr(jax.config, "update", lambda *args: None)
    return calls


def test_timeouts_reach_jax_distributed_initialize(recorded_jax_initialize):
    env = {"MEDJAX_HEARTBEAT_TIMEOUT": "70", "MEDJAX_SHUTDOWN_TIMEOUT": "90", "MEDJAX_INIT_TIMEOUT": "5"}
    layout = multihost.initialize("h:1", 2, 1, env=env, init_timeout=11)  # an argument wins over the env
    assert layout == ProcessLayout("flags", "h:1", 2, 1)
    multihost.initialize("h:1", 2, 0, env={})
    (args, given), (_, defaults) = recorded_jax_initialize
    assert args == ("h:1", 2, 1)
    # JAX's deadline is a little later than ours, so that ours reports first (see the next tests)
    assert given == dict(local_device_ids=None, initialization_timeout=11 + multihost.INIT_GRACE_S,
                         heartbeat_timeout_seconds=70, shutdown_timeout_seconds=90)
    assert defaults == dict(local_device_ids=None, initialization_timeout=300 + multihost.INIT_GRACE_S,
                            heartbeat_timeout_seconds=100, shutdown_timeout_seconds=300)
    assert multihost.timeouts({}) == Timeouts(init=300, heartbeat=100, shutdown=300)


@pytest.mark.parametrize("env, kwargs, message", [
    ({"MEDJAX_HEARTBEAT_TIMEOUT": "ten"}, {}, "environment variable MEDJAX_HEARTBEAT_TIMEOUT='ten': expected a whole"),
    ({"MEDJAX_INIT_TIMEOUT": "0"}, {}, "environment variable MEDJAX_INIT_TIMEOUT='0': expected a positive"),
    ({}, {"shutdown_timeout": -3}, "shutdown_timeout=-3: expected a positive whole number of seconds"),
])
def test_bad_timeouts_name_the_setting(recorded_jax_initialize, env, kwargs, message):
    with pytest.raises(ValueError, match=message):
        multihost.initialize("h:1", 2, 0, env=env, **kwargs)
    assert not recorded_jax_initialize


def test_a_coordination_timeout_names_the_variable_to_raise():
    hint = multihost._timeout_hint("DEADLINE_EXCEEDED: Barrier timed out. Id: x")
    assert "raise MEDJAX_HEARTBEAT_TIMEOUT (now" in hint and "MEDJAX_SHUTDOWN_TIMEOUT" in hint
    assert multihost._timeout_hint("gloo: Connection reset by peer") == ""


def test_init_timeout_ends_the_process_naming_the_variable(tmp_path):
    """Nobody joins: both a process 1 without a coordinator and a process 0 (the coordinator) without
    process 1 exit after MEDJAX_INIT_TIMEOUT with an error that names it, before JAX's own abort."""
    code = "from medjax.parallel import multihost; multihost.initialize(); print('JOINED')"
    with reserve_port() as port0, reserve_port() as port1:
        procs = {}
        for i, port in ((0, port0), (1, port1)):
            env = {k: v for k, v in os.environ.items() if not k.startswith("MEDJAX_")}
            env.update(MEDJAX_COORDINATOR=f"127.0.0.1:{port}", MEDJAX_NUM_PROCESSES="2", MEDJAX_PROCESS_ID=str(i),
                       MEDJAX_INIT_TIMEOUT="1", JAX_PLATFORMS="cpu", PYTHONPATH=ROOT)
            procs[i] = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                                        text=True, env=env, cwd=ROOT)
        outputs = {i: p.communicate(timeout=120)[0] for i, p in procs.items()}
    for i, port in ((0, port0), (1, port1)):
        assert procs[i].returncode == 1, outputs[i]
        assert (f"error: process {i} of 2 could not join the multi-process run (MEDJAX_* environment) within "
                f"MEDJAX_INIT_TIMEOUT=1 s") in outputs[i], outputs[i]
        assert f"127.0.0.1:{port}" in outputs[i] and "raise MEDJAX_INIT_TIMEOUT" in outputs[i]
        assert "JOINED" not in outputs[i] and "DEADLINE_EXCEEDED" not in outputs[i]
    assert "it is up, so some of the 2 processes have not joined" in outputs[0]
    assert "accepts no connections (process 0 starts it" in outputs[1]


def _bound_elsewhere(port: int) -> bool:
    """Whether a plain socket (no SO_REUSEPORT) fails to bind the port."""
    with socket.socket() as s:
        try:
            s.bind(("127.0.0.1", port))
        except OSError:
            return True
        return False


def test_reserved_ports_are_never_handed_out_twice(tmp_path):
    """Concurrent callers (threads here, 4 processes beside) all get different ports, which nobody
    else can bind while they are held; binding port 0 and closing it (the old way) repeats ports."""
    holders = [subprocess.Popen([sys.executable, os.path.join(ROOT, "medjax", "parallel", "ports.py"),
                                 "--while-alive", str(os.getpid())], stdout=subprocess.PIPE, text=True)
               for _ in range(4)]
    reservations, lock = [], threading.Lock()

    def take(count):
        for _ in range(count):
            r = reserve_port()
            with lock:
                reservations.append(r)

    threads = [threading.Thread(target=take, args=(50,)) for _ in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    try:
        held = [r.port for r in reservations] + [int(h.stdout.readline()) for h in holders]
        assert len(held) == 404 and len(set(held)) == 404
        assert all(_bound_elsewhere(p) for p in held[::20])
    finally:
        for r in reservations:
            r.close()
        for h in holders:
            h.kill()
            h.wait()
    assert not _bound_elsewhere(reservations[0].port)  # closed: free again


def test_a_port_locked_by_another_caller_is_skipped(monkeypatch):
    """Even when the kernel offers a port that another medjax caller holds (SO_REUSEPORT lets the
    bind succeed), its lock file turns it down and the next offer is taken."""
    held = reserve_port()
    offers = []

    class OfferingTheHeldPortFirst(socket.socket):
        def bind(self, address):
            offers.append(address)
            super().bind((address[0], held.port) if len(offers) == 1 else address)

    monkeypatch.setattr(ports.socket, "socket", OfferingTheHeldPortFirst)
    with held, reserve_port() as port:
        assert len(offers) == 2 and port != held.port


# ----------------------------------------------------------------------------- launch scripts
def _script(name, *args, **env):
    return subprocess.run([os.path.join(ROOT, "launch", name), *args], capture_output=True, text=True,
                          env=dict(os.environ, **env), timeout=60)


def test_local_dry_run_prints_each_process():
    out = _script("local.sh", "2", "python", "-m", "medjax.train", "--exp", "a b", DRY_RUN="1",
                  MEDJAX_COORDINATOR_PORT="4567", XLA_FLAGS="--xla_force_host_platform_device_count=8 --xla_dump_to=x")
    assert out.returncode == 0, out.stderr
    lines = out.stdout.splitlines()
    assert len(lines) == 2
    for i, line in enumerate(lines):
        assert shlex.split(line) == [
            f"[{i}]", "env", "JAX_PLATFORMS=cpu",
            "XLA_FLAGS=--xla_force_host_platform_device_count=1 --xla_dump_to=x",  # the caller's other flags kept
            "MEDJAX_COORDINATOR=127.0.0.1:4567", "MEDJAX_NUM_PROCESSES=2", f"MEDJAX_PROCESS_ID={i}",
            "MEDJAX_HEARTBEAT_TIMEOUT=60", "PYTHONUNBUFFERED=1", "python", "-m", "medjax.train", "--exp", "a b"]


def test_local_prefixes_output_and_stops_the_rest_on_failure():
    ok = _script("local.sh", "2", "bash", "-c", 'echo "id=$MEDJAX_PROCESS_ID of $MEDJAX_NUM_PROCESSES"')
    assert ok.returncode == 0 and sorted(ok.stdout.splitlines()) == ["[0] id=0 of 2", "[1] id=1 of 2"]
    start = time.monotonic()
    failed = _script("local.sh", "3", "bash", "-c", 'if [ "$MEDJAX_PROCESS_ID" = 1 ]; then exit 3; fi; sleep 60',
                     STOP_GRACE="2")
    assert failed.returncode == 3 and time.monotonic() - start < 20
    assert "local.sh: process 1 exited with status 3; stopping the others" in failed.stderr


def test_local_rejects_a_bad_count():
    out = _script("local.sh", "two", "true")
    assert out.returncode == 2 and "N must be a positive integer, got 'two'" in out.stderr


def test_tpu_pod_dry_run():
    out = _script("tpu_pod.sh", "python", "-m", "medjax.train", "--exp", "a b", DRY_RUN="1", TPU_NAME="my-pod",
                  ZONE="us-central2-b", SETUP="pip install -e .")
    assert out.returncode == 0, out.stderr
    words = shlex.split(out.stdout)
    assert words[:7] == ["gcloud", "compute", "tpus", "tpu-vm", "ssh", "my-pod", "--zone=us-central2-b"]
    assert "--worker=all" in words
    remote = words[-1].removeprefix("--command=")
    assert shlex.split(remote) == ["cd", "medjax", "&&", "pip", "install", "-e", ".", "&&", "MEDJAX_DISTRIBUTED=auto",
                                   "PYTHONUNBUFFERED=1", "python", "-m", "medjax.train", "--exp", "a b"]
    missing = _script("tpu_pod.sh", "python", DRY_RUN="1", ZONE="z")
    assert missing.returncode != 0 and "set TPU_NAME" in missing.stderr


def test_slurm_dry_run():
    out = _script("slurm.sbatch", "python", "-m", "medjax.train", "--exp", "mrm_retina", DRY_RUN="1",
                  SLURM_JOB_NODELIST="gpu[01-02]", SLURM_JOB_ID="77")
    assert out.returncode == 0, out.stderr
    assert shlex.split(out.stdout.splitlines()[-1]) == [
        f"MEDJAX_COORDINATOR_PORT={77 + 61440}", "srun", "--kill-on-bad-exit=1", "--label",
        "python", "-m", "medjax.train", "--exp", "mrm_retina"]
    # the port the script exports is the one multihost derives from the job id
    env = {"SLURM_JOB_ID": "77", "SLURM_NTASKS": "2", "SLURM_PROCID": "0", "SLURM_JOB_NODELIST": "gpu[01-02]"}
    assert resolve(env=env).coordinator == f"gpu01:{77 + 61440}"


def test_gke_jobset_manifest_is_consistent():
    import yaml

    with open(os.path.join(ROOT, "launch", "gke_jobset.yaml")) as f:
        jobset = yaml.safe_load(f)
    assert jobset["kind"] == "JobSet"
    job = jobset["spec"]["replicatedJobs"][0]
    spec = job["template"]["spec"]
    container = spec["template"]["spec"]["containers"][0]
    env = {e["name"]: e.get("value") or e["valueFrom"]["fieldRef"]["fieldPath"] for e in container["env"]}
    assert int(env["MEDJAX_NUM_PROCESSES"]) == spec["parallelism"] == spec["completions"]
    assert env["JOBSET_NAME"] == "metadata.labels['jobset.sigs.k8s.io/jobset-name']"
    assert {"REPLICATED_JOB_NAME", "JOB_INDEX"} <= set(env)  # multihost's JobSet layout reads them
    assert int(env["MEDJAX_COORDINATOR_PORT"]) == container["ports"][0]["containerPort"]
    assert spec["completionMode"] == "Indexed"
    assert container["command"][:3] == ["python", "-m", "medjax.train"]


# ----------------------------------------------------------------------------- real 2-process runs
# One encoder block instead of the tiny variant's 2: what is compared (losses, resume, exit) holds at any depth,
# and each of the ~6 processes compiles and runs less (~3 CPU s each).
TRAIN = [sys.executable, "-u", "-m", "medjax.train", "--exp", "mrm_retina", "--variant", "tiny",
         "--set", "kernels.impl=reference", "--set", "train.log_every=1", "--set", "train.steps=100",
         "--set", "model.depth=1"]
# Compile-time savers for CPU tests (both sides of every comparison use them).
FAST_COMPILE_FLAGS = ("--xla_backend_optimization_level=0 --xla_llvm_disable_expensive_passes=true "
                      "--xla_cpu_use_fusion_emitters=false")  # as tests/conftest.py


@pytest.fixture(scope="module")
def run_env(tmp_path_factory):
    """Environment of the runs: one persistent compilation cache, from which process 0 of a later
    run loads its compiled programs (JAX writes entries from process 0 only; on CPU the other
    processes' cache keys differ, so they compile)."""
    cache = str(tmp_path_factory.mktemp("jax_cache"))
    env = {k: v for k, v in os.environ.items() if not k.startswith("MEDJAX_")}
    env.update(JAX_COMPILATION_CACHE_DIR=cache, JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS="0",
               JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES="0", MEDJAX_HEARTBEAT_TIMEOUT=str(HEARTBEAT_S),
               PYTHONPATH=ROOT + os.pathsep + env.get("PYTHONPATH", ""), JAX_PLATFORMS="cpu")
    return env


def _devices(env, count):
    return dict(env, XLA_FLAGS=f"--xla_force_host_platform_device_count={count} {FAST_COMPILE_FLAGS}")


def _records(workdir):
    with open(os.path.join(workdir, "metrics.jsonl")) as f:
        return [json.loads(line) for line in f]


def _computed(record):
    """A metrics record without its wall-clock fields."""
    return {k: v for k, v in record.items() if k not in ("time", "examples_per_sec")}


def _command(launcher, workdir, data, *sets):
    return launcher + TRAIN + ["--data", data, "--workdir", str(workdir)] + [a for s in sets for a in ("--set", s)]


def _finished(proc, timeout=600):
    stdout, _ = proc.communicate(timeout=timeout)
    assert proc.returncode == 0, stdout[-5000:]
    return stdout


RUN = ("train.stop_at=3", "train.checkpoint_every=2")  # steps 1-3 of a 100-step schedule; saves at 2 and 3


@pytest.fixture(scope="module")
def two_process_run(run_env, fundus_demo, tmp_path_factory):
    """launch/local.sh 2 python -m medjax.train ...: 2 processes of 1 CPU device each."""
    workdir = tmp_path_factory.mktemp("two_processes")
    proc = subprocess.Popen(_command([LOCAL, "2"], workdir, fundus_demo, *RUN), stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True, env=_devices(run_env, 1), cwd=ROOT)
    return workdir, _finished(proc)


@pytest.fixture(scope="module")
def one_process_run(two_process_run, run_env, fundus_demo, tmp_path_factory):
    """The same run in one process holding both devices (the same mesh and global batch). Started in
    the background: it compiles on the core that the resumed 2-process run leaves idle."""
    workdir = tmp_path_factory.mktemp("one_process")
    proc = subprocess.Popen(_command([], workdir, fundus_demo, *RUN), stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True, env=_devices(run_env, 2), cwd=ROOT)
    yield workdir, proc
    proc.kill()


@pytest.fixture
def coordinator_port():
    """A free port for a test's own coordinator, reserved for it until the test ends."""
    with reserve_port() as port:
        yield port


def test_resume_is_exact_and_a_killed_process_ends_the_other(two_process_run, one_process_run, run_env,
                                                             fundus_demo, tmp_path, coordinator_port):
    """2 processes resume the run from its step-2 checkpoint (as after a crash before step 3's):
    step 3 is computed bitwise as in the uninterrupted run. Then SIGKILL process 1: process 0 exits
    non-zero, saying that another process died, within the heartbeat timeout (plus slack)."""
    workdir, _ = two_process_run
    resumed = tmp_path / "resumed"
    shutil.copytree(workdir, resumed)
    shutil.rmtree(resumed / "checkpoints" / "3")
    port, procs = coordinator_port, []
    for i in range(2):
        env = dict(_devices(run_env, 1), MEDJAX_COORDINATOR=f"127.0.0.1:{port}", MEDJAX_NUM_PROCESSES="2",
                   MEDJAX_PROCESS_ID=str(i))
        output = subprocess.PIPE if i == 0 else open(tmp_path / f"process_{i}.log", "w")
        procs.append(subprocess.Popen(_command([], resumed, fundus_demo, "train.checkpoint_every=1000"), stdout=output,
                                      stderr=subprocess.STDOUT, text=True, env=env, cwd=ROOT))
    seen = []
    try:
        for line in procs[0].stdout:
            seen.append(line)
            if line.startswith("step 3/"):
                break
        else:
            pytest.fail("the resumed 2-process run did not reach step 3:\n" + "".join(seen[-30:]))
        procs[1].send_signal(signal.SIGKILL)
        killed_at = time.monotonic()
        output, _ = procs[0].communicate(timeout=HEARTBEAT_S + 60)
        elapsed = time.monotonic() - killed_at
        (tmp_path / "process_0.log").write_text("".join(seen) + output + f"\nexited {elapsed:.1f}s after the kill\n")
        print(f"process 0 exited {elapsed:.1f} s after process 1 was killed")
    finally:
        for p in procs:
            p.kill()
    assert any("at step 2" in line and line.startswith("resumed from") for line in seen), "".join(seen)
    records, original = _records(resumed), _records(workdir)
    # The copied log up to the restored step 2 (its step-3 row dropped on resume), then the resumed run's.
    assert [r["step"] for r in records[:3]] == [1, 2, 3]
    assert _computed(records[2]) == _computed(original[2])
    assert procs[0].returncode != 0
    assert elapsed < HEARTBEAT_S + 30, elapsed
    assert "another process has probably died" in output or "another task died" in output, output[-3000:]


def test_two_processes_train_like_one(two_process_run, one_process_run):
    workdir, stdout = two_process_run
    assert "[0] step 3/100" in stdout and "[1] step" not in stdout  # only process 0 logs
    one, proc = one_process_run
    _finished(proc)
    two, single = _records(workdir), _records(one)
    assert [r["step"] for r in two] == [1, 2, 3]
    np.testing.assert_allclose([r["loss"] for r in two], [r["loss"] for r in single], rtol=1e-5)
    assert two[2]["loss"] != two[0]["loss"]
    # Each checkpoint is written once, collectively: one state, and each process's data iterator.
    final = os.path.join(workdir, "checkpoints", "3")
    assert sorted(os.listdir(os.path.join(final, "data"))) == [
        "commit_success.txt", "process_0-of-2.json", "process_1-of-2.json"]
    assert os.path.isfile(os.path.join(final, "state", "_METADATA"))


def test_sigterm_to_one_process_stops_all_at_the_same_step(tmp_path, coordinator_port):
    """A preemption notice that reaches one host only: every process saves the same checkpoint step
    and exits cleanly (the toy task of tests/toy_task.py, run by this file's __main__)."""
    port, procs = coordinator_port, []
    for i in range(2):
        env = {k: v for k, v in os.environ.items() if not k.startswith("MEDJAX_")}
        env.update(XLA_FLAGS=f"--xla_force_host_platform_device_count=1 {FAST_COMPILE_FLAGS}", JAX_PLATFORMS="cpu",
                   PYTHONPATH=ROOT + os.pathsep + env.get("PYTHONPATH", ""), MEDJAX_COORDINATOR=f"127.0.0.1:{port}",
                   MEDJAX_NUM_PROCESSES="2", MEDJAX_PROCESS_ID=str(i), MEDJAX_HEARTBEAT_TIMEOUT=str(HEARTBEAT_S))
        procs.append(subprocess.Popen([sys.executable, "-u", "-m", "tests.parallel.test_multihost", str(tmp_path)],
                                      stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env, cwd=ROOT))
    seen = []
    try:
        for line in procs[0].stdout:
            seen.append(line)
            if line.startswith("step 5/"):
                break
        else:
            pytest.fail("the toy run did not reach step 5:\n" + "".join(seen[-30:]))
        procs[1].send_signal(signal.SIGTERM)
        outputs = [p.communicate(timeout=60)[0] for p in procs]
    finally:
        for p in procs:
            p.kill()
    assert [p.returncode for p in procs] == [0, 0], outputs
    saved = [line for line in outputs[0].splitlines() if line.startswith("SIGTERM: saving a checkpoint at step")]
    assert len(saved) == 1, outputs[0][-3000:]
    step = int(saved[0].split("at step ")[1].split()[0])
    results = [json.loads(out.strip().splitlines()[-1]) for out in outputs]
    assert results == [{"step": step, "preempted": True}] * 2
    assert sorted(os.listdir(tmp_path / "checkpoints" / str(step) / "data")) == [
        "commit_success.txt", "process_0-of-2.json", "process_1-of-2.json"]


def _toy_main(workdir: str) -> None:
    """`python -m tests.parallel.test_multihost WORKDIR`: this process's part of a multi-process
    toy run (layout from MEDJAX_*), until SIGTERM; prints {"step", "preempted"} as its last line."""
    multihost.initialize()
    with multihost.exit_on_failure():
        from medjax.trainer import Trainer
        from tests.toy_task import ToyTask, toy_config

        config = toy_config(steps=10**9, checkpoint_every=10**9, log_every=1)
        result = Trainer(config, ToyTask(config), workdir).run()
        print(json.dumps({"step": result["step"], "preempted": result["preempted"]}), flush=True)


if __name__ == "__main__":
    _toy_main(sys.argv[1])
