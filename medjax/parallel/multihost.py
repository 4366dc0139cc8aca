"""Multi-process initialisation: `jax.distributed.initialize` from flags or the environment.

Where the process layout comes from, first match wins:

1. flags `--coordinator HOST:PORT --num-processes N --process-id I` (missing ones from MEDJAX_*);
2. MEDJAX_COORDINATOR, MEDJAX_NUM_PROCESSES, MEDJAX_PROCESS_ID (set by launch/local.sh);
3. a TPU pod: MEDJAX_DISTRIBUTED=auto (launch/tpu_pod.sh; JAX_DISTRIBUTED=auto also works) or the
   GKE TPU webhook's TPU_WORKER_HOSTNAMES naming several hosts; JAX reads the rest from the TPU
   VM metadata or the webhook's environment;
4. SLURM under `srun`: SLURM_NTASKS processes, this one SLURM_PROCID; the coordinator is the first
   host of SLURM_STEP_NODELIST (or SLURM_JOB_NODELIST) on MEDJAX_COORDINATOR_PORT (default: a port
   derived from SLURM_JOB_ID, as JAX does). With several tasks on a node each GPU process uses
   only GPU SLURM_LOCALID (unless CUDA_VISIBLE_DEVICES already names a single GPU);
5. a GKE JobSet (launch/gke_jobset.yaml sets JOBSET_NAME, REPLICATED_JOB_NAME and JOB_INDEX from
   the pod's labels): this pod is JOB_COMPLETION_INDEX (+ JOB_INDEX times MEDJAX_PROCESSES_PER_JOB),
   MEDJAX_NUM_PROCESSES in all, and the coordinator is pod 0 of job 0 through the JobSet's headless
   service, `<jobset>-<replicated job>-0-0.<subdomain>`, on MEDJAX_COORDINATOR_PORT (default 8476).

Nothing matching (or one process) means a plain single-process run. On CPU, gloo collectives let
several local processes run one program; `initialize` connects them at start-up, with every process
at a barrier, because gloo allows the first collective over a group of devices only a fixed 30 s for
all processes to arrive, less than compile times can differ between processes on a busy machine.

Timeouts (whole seconds; `initialize(...)` arguments win over the environment):

  MEDJAX_INIT_TIMEOUT       every process must have joined within it (default 300). Processes start
                            in any order; process 0 runs the coordinator. When it passes, the
                            process exits with an error naming the coordinator and this variable.
  MEDJAX_HEARTBEAT_TIMEOUT  a process that sends no heartbeat for this long is declared dead and the
                            JAX runtime ends every process ("heartbeat timeout", "The tasks have
                            crashed"; default 100, JAX's). On an overloaded machine a live but
                            starved process can miss it: raise it rather than lower it.
  MEDJAX_SHUTDOWN_TIMEOUT   how long a finished process waits at exit for the others (default 300).

Failure of one process: the others are terminated by the JAX runtime after MEDJAX_HEARTBEAT_TIMEOUT
seconds at the latest. A survivor usually notices sooner, when a collective with the dead process
fails: `exit_on_failure` then prints one clear error and exits at once instead of waiting for the
shutdown barrier.
"""
from __future__ import annotations

import contextlib
import dataclasses
import os
import re
import socket
import sys
import threading
import traceback
from typing import Iterator, Mapping

GKE_DEFAULT_PORT = 8476


@dataclasses.dataclass(frozen=True)
class ProcessLayout:
    """How this process joins a multi-process run. `coordinator=None`: JAX detects the TPU pod."""

    source: str
    coordinator: str | None
    num_processes: int | None
    process_id: int | None
    local_device_ids: tuple[int, ...] | None = None


def _int(env: Mapping[str, str], name: str, expected: str) -> int:
    text = env[name]
    try:
        return int(text)
    except ValueError:
        raise ValueError(f"environment variable {name}={text!r}: expected {expected}") from None


def first_host(nodelist: str) -> str:
    """The first host of a SLURM node list: 'gpu[003-007,010],cpu1' -> 'gpu003', 'a[1-2]-ib[5-6]' -> 'a1-ib5'."""
    depth, end = 0, len(nodelist)
    for i, ch in enumerate(nodelist):
        depth += ch == "["
        depth -= ch == "]"
        if ch == "," and depth == 0:
            end = i
            break
    first = nodelist[:end].strip()
    host = re.sub(r"\[([^\]]*)\]", lambda m: re.split(r"[-,]", m.group(1))[0], first)
    if not host or "[" in host or "]" in host:
        raise ValueError(f"SLURM node list {nodelist!r}: cannot read its first host name")
    return host


def _explicit(coordinator, num_processes, process_id, env, source) -> ProcessLayout:
    if num_processes is None and env.get("MEDJAX_NUM_PROCESSES"):
        num_processes = _int(env, "MEDJAX_NUM_PROCESSES", "the number of processes")
    if process_id is None and env.get("MEDJAX_PROCESS_ID"):
        process_id = _int(env, "MEDJAX_PROCESS_ID", "this process's id")
    coordinator = coordinator or env.get("MEDJAX_COORDINATOR")
    missing = [name for name, value in (("--coordinator/MEDJAX_COORDINATOR", coordinator),
                                        ("--num-processes/MEDJAX_NUM_PROCESSES", num_processes),
                                        ("--process-id/MEDJAX_PROCESS_ID", process_id)) if value is None]
    if missing:
        raise ValueError(f"multi-process run from {source}: also needs {', '.join(missing)}")
    if ":" not in coordinator:
        raise ValueError(f"coordinator {coordinator!r} from {source}: expected HOST:PORT")
    if not 0 <= process_id < num_processes:
        raise ValueError(f"process id {process_id} from {source}: expected 0 <= id < {num_processes} processes")
    return ProcessLayout(source, coordinator, num_processes, process_id)


def _slurm(env: Mapping[str, str]) -> ProcessLayout | None:
    if "SLURM_PROCID" not in env or "SLURM_NTASKS" not in env:  # srun sets both; salloc/sbatch shells do not
        return None
    count = _int(env, "SLURM_NTASKS", "the number of tasks")
    if count <= 1:
        return None
    nodelist = env.get("SLURM_STEP_NODELIST") or env.get("SLURM_JOB_NODELIST")
    if not nodelist:
        raise ValueError("SLURM run with several tasks but neither SLURM_STEP_NODELIST nor SLURM_JOB_NODELIST is set")
    if env.get("MEDJAX_COORDINATOR_PORT"):
        port = _int(env, "MEDJAX_COORDINATOR_PORT", "a TCP port")
    else:  # JAX's choice: a port in [61440, 65535] from the job id, the same on every node
        port = _int(env, "SLURM_JOB_ID", "the job id") % 2**12 + 65536 - 2**12
    local_ids = None
    tasks_here = env.get("SLURM_STEP_TASKS_PER_NODE") or env.get("SLURM_TASKS_PER_NODE") or "1"
    visible = [d for d in env.get("CUDA_VISIBLE_DEVICES", "").split(",") if d]
    if int(re.match(r"\d+", tasks_here).group()) > 1 and "SLURM_LOCALID" in env and len(visible) != 1:
        local_ids = (_int(env, "SLURM_LOCALID", "the task's index on its node"),)
    return ProcessLayout("SLURM", f"{first_host(nodelist)}:{port}", count,
                         _int(env, "SLURM_PROCID", "the task's rank"), local_ids)


def _jobset(env: Mapping[str, str]) -> ProcessLayout | None:
    if "JOB_COMPLETION_INDEX" not in env or "JOBSET_NAME" not in env:
        return None
    if not env.get("MEDJAX_NUM_PROCESSES"):
        raise ValueError("GKE JobSet run: set MEDJAX_NUM_PROCESSES (pods in all) in the pod's env")
    count = _int(env, "MEDJAX_NUM_PROCESSES", "the number of processes")
    index = _int(env, "JOB_COMPLETION_INDEX", "the pod's index in its Job")
    job = _int(env, "JOB_INDEX", "the Job's index in the JobSet") if env.get("JOB_INDEX") else 0
    if job:
        if not env.get("MEDJAX_PROCESSES_PER_JOB"):
            raise ValueError(f"GKE JobSet run with JOB_INDEX={job}: set MEDJAX_PROCESSES_PER_JOB (pods per Job)")
        index += job * _int(env, "MEDJAX_PROCESSES_PER_JOB", "pods per Job")
    name, replicated = env["JOBSET_NAME"], env.get("REPLICATED_JOB_NAME", "workers")
    subdomain = env.get("MEDJAX_JOBSET_SUBDOMAIN") or name  # JobSet's default headless service
    port = _int(env, "MEDJAX_COORDINATOR_PORT", "a TCP port") if env.get("MEDJAX_COORDINATOR_PORT") else GKE_DEFAULT_PORT
    if count <= 1:
        return None
    return _explicit(f"{name}-{replicated}-0-0.{subdomain}:{port}", count, index, {}, "GKE JobSet")


def resolve(coordinator: str | None = None, num_processes: int | None = None, process_id: int | None = None,
            env: Mapping[str, str] | None = None) -> ProcessLayout | None:
    """The layout this process joins (see the module docstring), or None for a single-process run."""
    env = os.environ if env is None else env
    if coordinator is not None or num_processes is not None or process_id is not None:
        layout = _explicit(coordinator, num_processes, process_id, env, "flags")
    elif env.get("MEDJAX_COORDINATOR"):
        layout = _explicit(None, None, None, env, "MEDJAX_* environment")
    elif "auto" in (env.get("MEDJAX_DISTRIBUTED"), env.get("JAX_DISTRIBUTED")) or "," in env.get("TPU_WORKER_HOSTNAMES", ""):
        return ProcessLayout("TPU pod (detected by JAX)", None, None, None)
    else:
        layout = _slurm(env) or _jobset(env)
    return layout if layout is not None and layout.num_processes > 1 else None


@dataclasses.dataclass(frozen=True)
class Timeouts:
    """The coordination service's timeouts, in seconds (see the module docstring)."""

    init: int = 300
    heartbeat: int = 100
    shutdown: int = 300


TIMEOUT_VARIABLES = {"init": "MEDJAX_INIT_TIMEOUT", "heartbeat": "MEDJAX_HEARTBEAT_TIMEOUT",
                     "shutdown": "MEDJAX_SHUTDOWN_TIMEOUT"}
# JAX's own initialization deadline is this much later than ours, so that ours fires first and the
# process ends with a message naming MEDJAX_INIT_TIMEOUT rather than JAX's bare DEADLINE_EXCEEDED.
INIT_GRACE_S = 10


def timeouts(env: Mapping[str, str] | None = None, *, init: int | None = None, heartbeat: int | None = None,
             shutdown: int | None = None) -> Timeouts:
    """The timeouts of a multi-process run: arguments, else MEDJAX_*_TIMEOUT, else the defaults."""
    env = os.environ if env is None else env
    given = dict(init=init, heartbeat=heartbeat, shutdown=shutdown)
    values = {}
    for field, name in TIMEOUT_VARIABLES.items():
        if given[field] is not None:
            value, where = given[field], f"{field}_timeout={given[field]!r}"
        elif env.get(name):
            value, where = _int(env, name, "a whole number of seconds"), f"environment variable {name}={env[name]!r}"
        else:
            continue
        if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
            raise ValueError(f"{where}: expected a positive whole number of seconds")
        values[field] = value
    return Timeouts(**values)


def _accepts_connections(address: str) -> bool:
    host, port = address.rsplit(":", 1)
    try:
        with socket.create_connection((host.strip("[]"), int(port)), timeout=2):
            return True
    except (OSError, ValueError):
        return False


def _init_deadline(layout: ProcessLayout, limits: Timeouts) -> threading.Timer:
    """A timer that ends this process with a clear error if initialisation outlives MEDJAX_INIT_TIMEOUT.

    JAX's own timeout (set INIT_GRACE_S later) would abort the process from C++ with a bare
    DEADLINE_EXCEEDED; the main thread is blocked inside that call, so this thread reports instead."""
    def expire():
        who = (f"process {layout.process_id} of {layout.num_processes}" if layout.process_id is not None
               else "this process")
        if layout.coordinator is None:
            where = "the coordinator JAX detected for the TPU pod"
        elif _accepts_connections(layout.coordinator):
            where = (f"the coordinator at {layout.coordinator} (it is up, so some of the "
                     f"{layout.num_processes} processes have not joined: are they all started?)")
        else:
            where = (f"the coordinator at {layout.coordinator}, which accepts no connections (process 0 "
                     f"starts it: is it running, and is the address right?)")
        print(f"error: {who} could not join the multi-process run ({layout.source}) within "
              f"MEDJAX_INIT_TIMEOUT={limits.init} s: jax.distributed.initialize waits until every process "
              f"has connected to {where}. If the processes are only slow to start (a busy machine, a slow "
              f"file system), raise MEDJAX_INIT_TIMEOUT (seconds).", file=sys.stderr, flush=True)
        sys.stdout.flush()
        os._exit(1)

    timer = threading.Timer(limits.init, expire)
    timer.daemon = True
    return timer


def initialize(coordinator: str | None = None, num_processes: int | None = None, process_id: int | None = None,
               env: Mapping[str, str] | None = None, *, init_timeout: int | None = None,
               heartbeat_timeout: int | None = None, shutdown_timeout: int | None = None) -> ProcessLayout | None:
    """Start the multi-process runtime when a layout is found; returns it (None: single process).

    Must run before anything touches a JAX backend. Timeouts in seconds: the arguments, else
    MEDJAX_INIT_TIMEOUT (every process must have joined within it; default 300),
    MEDJAX_HEARTBEAT_TIMEOUT (a process silent this long is declared dead; default 100),
    MEDJAX_SHUTDOWN_TIMEOUT (waiting for every process at exit; default 300).
    If the processes have not all joined within the init timeout, this process exits (status 1)
    with an error naming the coordinator and MEDJAX_INIT_TIMEOUT. On CPU it then initialises the
    backend and connects the gloo collectives of all devices (see `_connect_cpu_collectives`).
    """
    env = os.environ if env is None else env
    layout = resolve(coordinator, num_processes, process_id, env)
    if layout is None:
        return None
    limits = timeouts(env, init=init_timeout, heartbeat=heartbeat_timeout, shutdown=shutdown_timeout)
    import jax

    # CPU collectives across processes (affects only the CPU backend; must precede backend init).
    jax.config.update("jax_cpu_collectives_implementation", "gloo")
    deadline = _init_deadline(layout, limits)
    deadline.start()
    try:
        jax.distributed.initialize(
            layout.coordinator, layout.num_processes, layout.process_id,
            local_device_ids=list(layout.local_device_ids) if layout.local_device_ids else None,
            initialization_timeout=limits.init + INIT_GRACE_S, heartbeat_timeout_seconds=limits.heartbeat,
            shutdown_timeout_seconds=limits.shutdown)
    finally:
        deadline.cancel()
    _connect_cpu_collectives(layout, limits)
    return layout


def _connect_cpu_collectives(layout: ProcessLayout, limits: Timeouts) -> None:
    """On CPU, open the gloo connections between all devices now, with every process at a barrier.

    gloo connects the devices of a collective the first time one runs, and gives up when a peer
    has not arrived within 30 s ("Gloo context initialization failed: DEADLINE_EXCEEDED:
    GetKeyValue() timed out"; a fixed limit, not configurable). The first collective of a run
    comes after compiling the step, which takes very different times in different processes: a
    process that loads its programs from the persistent compilation cache (JAX writes it from
    process 0 only) or that runs on a less busy core arrives minutes earlier than the others on a
    loaded machine. Once connected, a collective waits for late peers far longer, so the
    connections over all devices (the data-parallel all-reduce's) and over the processes (the
    all-gather of `multihost_utils.sync_global_devices`, used by checkpointing) are made here, with
    the processes released together by a coordination-service barrier (MEDJAX_INIT_TIMEOUT)."""
    import jax

    if jax.default_backend() != "cpu" or jax.process_count() == 1:
        return
    import jax.numpy as jnp
    import numpy as np
    from jax._src import distributed
    from jax.experimental import multihost_utils
    from jax.sharding import Mesh, NamedSharding, PartitionSpec

    mesh = Mesh(np.array(jax.devices()), ("all",))
    zeros = jax.make_array_from_process_local_data(NamedSharding(mesh, PartitionSpec("all")),
                                                   np.zeros((jax.local_device_count(),), np.int32))
    total = jax.jit(jnp.sum, out_shardings=NamedSharding(mesh, PartitionSpec())).lower(zeros).compile()
    try:
        distributed.global_state.client.wait_at_barrier("medjax:cpu_collectives", limits.init * 1000)
    except Exception as err:  # noqa: BLE001 - jaxlib raises its own error types
        raise TimeoutError(
            f"process {jax.process_index()} of {jax.process_count()}: the other processes did not reach the "
            f"start-up barrier within MEDJAX_INIT_TIMEOUT={limits.init} s ({type(err).__name__}: "
            f"{(str(err).strip().splitlines() or [''])[0]}). If they are alive and only slow to start, raise "
            f"MEDJAX_INIT_TIMEOUT (seconds).") from err
    total(zeros).block_until_ready()
    multihost_utils.sync_global_devices("medjax: CPU collectives connected")


@contextlib.contextmanager
def exit_on_failure() -> Iterator[None]:
    """In a multi-process run, an exception ends this process at once (status 1) with a clear message.

    A failed collective usually means another process died; waiting for the shutdown barrier would
    only delay the exit by the heartbeat timeout and bury the cause. Single-process: re-raises.
    """
    try:
        yield
    except BaseException as err:  # noqa: BLE001 - every failure must end the process promptly
        import jax

        if isinstance(err, (SystemExit, KeyboardInterrupt)) or jax.process_count() == 1:
            raise
        traceback.print_exc()
        first_line = (str(err).strip().splitlines() or [""])[0]
        print(f"error: process {jax.process_index()} of {jax.process_count()} stopped: "
              f"{type(err).__name__}: {first_line}\n"
              f"If this is a failed collective or barrier, another process has probably died: "
              f"see its output. Exiting now instead of waiting for it.{_timeout_hint(str(err))}",
              file=sys.stderr, flush=True)
        sys.stdout.flush()
        os._exit(1)


def _timeout_hint(message: str) -> str:
    """For an error that looks like a coordination timeout: which MEDJAX_* variable to raise."""
    if "Gloo context initialization failed" in message:
        return ("\nA collective over a new group of devices waited more than gloo's fixed 30 s for another "
                "process to join it: that process is slow (compiling, loading data) or has died. Collectives "
                "over all devices and over all processes are connected at start-up (multihost.initialize); "
                "this one was over another group.")
    if not re.search(r"DEADLINE_EXCEEDED|[Tt]imed out|[Tt]imeout|heartbeat|tasks have crashed", message):
        return ""
    try:
        limits = timeouts()
    except ValueError:  # a malformed variable: initialize has reported it already
        return ""
    return (f"\nIt looks like a timeout: if every process is alive and the machine is only busy, raise "
            f"MEDJAX_HEARTBEAT_TIMEOUT (now {limits.heartbeat} s) or, for a barrier at exit, "
            f"MEDJAX_SHUTDOWN_TIMEOUT (now {limits.shutdown} s).")
