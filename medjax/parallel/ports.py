"""A coordinator port for a local multi-process run, reserved so that nobody else takes it.

Binding port 0, closing the socket and handing the number to a coordinator that starts seconds
later is a race: in between the kernel may give the same number to another caller doing the same
(two test sessions, two `launch/local.sh` runs) or to an outgoing connection. JAX's coordinator
(gRPC) binds with SO_REUSEPORT, so a second coordinator on the same port does not even fail: the
two services silently share it, each gets some of the other run's processes, and both runs die
with coordination errors.

`reserve_port()` closes the race twice over:

* it keeps a socket bound to the port (with SO_REUSEPORT, so the coordinator can still bind it;
  bound, not listening, so it never receives a connection) for as long as the reservation is held:
  while it is, the kernel hands the port to no other bind(0) or outgoing connection;
* it takes an exclusive lock on `<tempdir>/medjax-ports/<port>.lock`, so no two medjax callers
  (threads, processes, test sessions of other checkouts) hold the same port at once, whatever the
  kernel's choice.

Hold the reservation until the run ends (`with reserve_port() as port: ...`).
`python medjax/parallel/ports.py --while-alive PID` prints a reserved port and holds it while
process PID runs (launch/local.sh uses it; the file needs only the standard library).
"""
from __future__ import annotations

import fcntl
import os
import socket
import sys
import tempfile
import time

LOCK_DIR = os.path.join(tempfile.gettempdir(), "medjax-ports")


class PortReservation:
    """A reserved TCP port (`.port`); `close()` (or leaving the `with` block) gives it back."""

    def __init__(self, port: int, sock: socket.socket, lock_file):
        self.port, self._sock, self._lock = port, sock, lock_file

    def close(self) -> None:
        if self._sock is not None:
            self._sock.close()
            self._lock.close()  # closing the file releases the lock; the file stays (unlinking would race)
            self._sock = self._lock = None

    def __enter__(self) -> int:
        return self.port

    def __exit__(self, *exc) -> None:
        self.close()

    def __del__(self):
        self.close()


def reserve_port(host: str = "127.0.0.1", attempts: int = 100) -> PortReservation:
    """A free TCP port on `host`, held for this caller alone until the reservation is closed."""
    os.makedirs(LOCK_DIR, exist_ok=True)
    for _ in range(attempts):
        sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
        sock.bind((host, 0))
        port = sock.getsockname()[1]
        lock = open(os.path.join(LOCK_DIR, f"{port}.lock"), "a")
        try:
            fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)  # per open file: excludes this process's other callers too
        except BlockingIOError:  # another medjax caller holds this number: ask the kernel again
            lock.close()
            sock.close()
            continue
        return PortReservation(port, sock, lock)
    raise RuntimeError(f"reserve_port: no free port on {host} after {attempts} attempts (locks in {LOCK_DIR})")


def pid_alive(pid: int) -> bool:
    """Whether process `pid` exists on this host (signal 0)."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # exists, owned by someone else
        return True
    return True


def _hold(argv: list[str]) -> None:
    """`python medjax/parallel/ports.py [--while-alive PID]`: print a reserved port, then hold it while
    process PID (default: the parent) runs."""
    if argv[:1] == ["--while-alive"] and len(argv) == 2 and argv[1].isdigit():
        pid = int(argv[1])
    elif not argv:
        pid = os.getppid()
    else:
        sys.exit("usage: python medjax/parallel/ports.py [--while-alive PID]")
    reservation = reserve_port()
    print(reservation.port, flush=True)
    sys.stdout.close()
    while pid_alive(pid):
        time.sleep(0.5)
    reservation.close()


if __name__ == "__main__":
    _hold(sys.argv[1:])
