"""A model worker never outlives the step that started it, and holds that step's GPU until it is gone.

A local step (``resources.workers.LocalModelWorkers``) starts the worker with two variables:

- :data:`STEP_PID_ENV`: the step's pid. The worker asks Linux to SIGKILL it when its parent dies
  (``prctl(PR_SET_PDEATHSIG)``, immediate), and a watchdog thread checks every half second that the step
  still lives. The watchdog covers what the signal cannot: the signal follows the parent *thread* that
  started the worker and only the direct parent (an interpreter wrapper in between, ``conda run`` or a
  shell script, hides the step's death), and a step that died before the worker set it is not signalled.
- :data:`LEASE_FD_ENV`: the descriptor of the step's GPU lease, inherited by the worker
  (:mod:`pseudolabel.gpu_lease`). An ``flock`` belongs to the open file, not to a process: it is released
  once every descriptor of it is closed, so the lease outlives a killed step for as long as the worker
  runs, and no one else is handed the GPU while the worker still uses it. The worker marks it
  non-inheritable, so only the worker itself, not processes it starts, keeps it.

A worker started without these (by hand, or in a Kubernetes pod, whose lifetime the pod manages) is
not bound to anything. Nothing here imports Dagster.
"""

from __future__ import annotations

import ctypes
import os
import signal
import sys
import threading
import time
from collections.abc import Callable, Mapping
from pathlib import Path

STEP_PID_ENV = "PSEUDOLABEL_STEP_PID"
LEASE_FD_ENV = "PSEUDOLABEL_GPU_LEASE_FD"
WATCHDOG_POLL_S = 0.5
_PR_SET_PDEATHSIG = 1  # <linux/prctl.h>


def set_parent_death_signal(sig: int = signal.SIGKILL) -> bool:
    """Have the kernel send ``sig`` to this process when the thread that started it ends (Linux only);
    False where that is not available."""
    if not sys.platform.startswith("linux"):
        return False
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        return libc.prctl(_PR_SET_PDEATHSIG, int(sig), 0, 0, 0) == 0
    except (OSError, AttributeError):
        return False


def process_token(pid: int) -> str | None:
    """Something that stays the same while process ``pid`` runs: its start time from ``/proc`` (a reused
    pid gets another); None when it is gone or a zombie. Without ``/proc``: "alive" or None."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except FileNotFoundError:
        if Path("/proc/self/stat").exists():
            return None
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            return None
        except PermissionError:
            pass
        return "alive"
    except OSError:
        return None
    fields = stat.rsplit(")", 1)[1].split()  # after "pid (comm)": state is field 3, starttime field 22
    return None if fields[0] in ("Z", "X", "x") else fields[19]


def _die() -> None:
    print("model worker: the step that started it is gone; stopping", file=sys.stderr, flush=True)
    os.kill(os.getpid(), signal.SIGKILL)


def watch_process(
    pid: int, poll_s: float = WATCHDOG_POLL_S, on_gone: Callable[[], None] = _die
) -> threading.Thread:
    """Call ``on_gone`` (default: SIGKILL this process) from a daemon thread as soon as process ``pid``
    is gone, checked every ``poll_s`` seconds; at once if it already is."""
    token = process_token(pid)

    def watch() -> None:
        while token is not None and process_token(pid) == token:
            time.sleep(poll_s)
        on_gone()

    thread = threading.Thread(target=watch, name=f"watch-step-{pid}", daemon=True)
    thread.start()
    return thread


def keep_lease_to_self(fd: int) -> bool:
    """Keep the inherited lease descriptor ``fd`` open in this process only (not inherited by processes
    it starts); False when no such descriptor is open."""
    try:
        os.set_inheritable(fd, False)
    except OSError:
        return False
    return True


def bind_to_step(environ: Mapping[str, str] | None = None) -> str | None:
    """Bind this worker's life to the step named in ``environ`` (default: this process's environment):
    parent-death signal, step watchdog, lease descriptor. Returns what was done, for the log; None when
    no step is named."""
    environ = os.environ if environ is None else environ
    raw = environ.get(STEP_PID_ENV, "").strip()
    if not raw.isdigit():
        return None
    step = int(raw)
    signalled = set_parent_death_signal()
    watch_process(step)
    done = f"ends with step pid {step} (watchdog every {WATCHDOG_POLL_S}s"
    done += ", parent-death signal)" if signalled else ")"
    lease = environ.get(LEASE_FD_ENV, "").strip()
    if lease.isdigit() and keep_lease_to_self(int(lease)):
        done += f"; holds its GPU lease (fd {lease}) until it exits"
    return done
