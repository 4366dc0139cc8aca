"""Multi-process initialisation: `jax.distributed.initialize` from flags or the environment.

Explicit flags (coordinator, number of processes, process id) or MEDJAX_COORDINATOR /
MEDJAX_NUM_PROCESSES / MEDJAX_PROCESS_ID; otherwise SLURM and TPU pods are auto-detected by JAX
when JAX_DISTRIBUTED=auto is set. On CPU, gloo collectives let several local processes work.
A single process with nothing configured does nothing.
"""
from __future__ import annotations

import os

import jax


def initialize(coordinator: str | None = None, num_processes: int | None = None, process_id: int | None = None) -> bool:
    """Returns True when a multi-process runtime was started."""
    coordinator = coordinator or os.environ.get("MEDJAX_COORDINATOR")
    if num_processes is None and os.environ.get("MEDJAX_NUM_PROCESSES"):
        num_processes = int(os.environ["MEDJAX_NUM_PROCESSES"])
    if process_id is None and os.environ.get("MEDJAX_PROCESS_ID"):
        process_id = int(os.environ["MEDJAX_PROCESS_ID"])
    auto = os.environ.get("JAX_DISTRIBUTED", "") == "auto"
    if coordinator is None and not auto:
        return False
    # CPU collectives across processes (affects only the CPU backend; must precede backend init).
    jax.config.update("jax_cpu_collectives_implementation", "gloo")
    if coordinator is None:
        jax.distributed.initialize()
    else:
        if num_processes is None or process_id is None:
            raise ValueError("--coordinator needs --num-processes and --process-id (or MEDJAX_NUM_PROCESSES/MEDJAX_PROCESS_ID)")
        jax.distributed.initialize(coordinator, num_processes, process_id)
    return True
