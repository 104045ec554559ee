"""GPU leases: distinct devices for concurrent holders, released on exit and on crash."""

import contextlib
import multiprocessing as mp
import os
import signal
import subprocess
import sys

import pytest

from pseudolabel.gpu_lease import NoFreeGpu, lease_gpu


def _hold_lease(lock_dir, num_devices, ready, release, results):
    with lease_gpu(num_devices, lock_dir, timeout_s=10, poll_s=0.05) as index:
        results.put(index)
        ready.set()
        release.wait(10)


def _hold_forever(lock_dir, ready):
    with lease_gpu(1, lock_dir, timeout_s=5, poll_s=0.05):
        ready.set()
        signal.pause()


def test_concurrent_processes_get_distinct_devices(tmp_path):
    ctx = mp.get_context("spawn")
    results, release = ctx.Queue(), ctx.Event()
    readies = [ctx.Event() for _ in range(3)]
    procs = [ctx.Process(target=_hold_lease, args=(tmp_path, 3, r, release, results)) for r in readies]
    for p in procs:
        p.start()
    for r in readies:
        assert r.wait(20)
    leased = sorted(results.get(timeout=5) for _ in procs)
    release.set()
    for p in procs:
        p.join(10)
    assert leased == [0, 1, 2]


def test_lease_released_after_block_and_after_failure(tmp_path):
    with lease_gpu(1, tmp_path, timeout_s=1) as first:
        assert first == 0
    with pytest.raises(RuntimeError), lease_gpu(1, tmp_path, timeout_s=1):
        raise RuntimeError("step failed")
    with lease_gpu(1, tmp_path, timeout_s=1) as again:
        assert again == 0


def test_lease_of_a_killed_process_is_freed(tmp_path):
    ctx = mp.get_context("spawn")
    ready = ctx.Event()
    proc = ctx.Process(target=_hold_forever, args=(tmp_path, ready))
    proc.start()
    assert ready.wait(20)
    with pytest.raises(NoFreeGpu), lease_gpu(1, tmp_path, timeout_s=0.2, poll_s=0.05):
        pass
    os.kill(proc.pid, signal.SIGKILL)
    proc.join(10)
    with lease_gpu(1, tmp_path, timeout_s=2, poll_s=0.05) as index:
        assert index == 0


def test_the_gpu_pool_command_sets_one_slot_per_visible_gpu(tmp_path):
    """`pseudolabel gpu-pool` (README, Operating it), as a user runs it, against a real instance."""
    import subprocess
    import sys
    from pathlib import Path

    from dagster import DagsterInstance

    command = str(Path(sys.executable).parent / "pseudolabel")
    env = {**os.environ, "DAGSTER_HOME": str(tmp_path), "PSEUDOLABEL_GPUS": "3"}
    (tmp_path / "dagster.yaml").write_text("")
    done = subprocess.run([command, "gpu-pool"], env=env, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    assert "limit set to 3" in done.stdout
    with DagsterInstance.from_config(str(tmp_path)) as instance:
        assert instance.event_log_storage.get_concurrency_info("gpu").slot_count == 3
    refused = subprocess.run(
        [command, "gpu-pool", "--limit", "0"], env=env, capture_output=True, text=True, timeout=120
    )
    assert refused.returncode == 1 and "must be >= 1" in refused.stderr


# A step that leases the GPU and starts a long-running child, with or without the lease's descriptor.
_STEP_WITH_CHILD = """
import subprocess, sys, time
from pathlib import Path
from pseudolabel.gpu_lease import hold_gpu

with hold_gpu(1, Path(sys.argv[1]), timeout_s=5) as lease:
    fds = (lease.fd,) if sys.argv[2] == "inherit" else ()
    child = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"], pass_fds=fds)
    print(child.pid, flush=True)
    time.sleep(60)
"""


@pytest.mark.parametrize("child", ["inherit", "no-inherit"])
def test_a_child_started_with_the_lease_holds_it_past_its_killed_parent(tmp_path, child):
    """The lease is an flock on the open file: a model worker started with its descriptor keeps the GPU
    leased while it runs, even after its step was killed; one started without it does not."""
    step = subprocess.Popen(
        [sys.executable, "-c", _STEP_WITH_CHILD, str(tmp_path), child], stdout=subprocess.PIPE, text=True
    )
    worker = int(step.stdout.readline())
    try:
        with pytest.raises(NoFreeGpu), lease_gpu(1, tmp_path, timeout_s=0):
            pass
        os.kill(step.pid, signal.SIGKILL)
        step.wait(10)
        if child == "inherit":
            with pytest.raises(NoFreeGpu), lease_gpu(1, tmp_path, timeout_s=0.3, poll_s=0.05):
                pass  # the step is gone, its worker is not
            os.kill(worker, signal.SIGKILL)
        with lease_gpu(1, tmp_path, timeout_s=5, poll_s=0.05) as index:
            assert index == 0
    finally:
        for pid in (step.pid, worker):
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
        step.wait(10)
        step.stdout.close()


def _worker_task():
    from pseudolabel.workers.task import DETECTIONS, WorkerTask

    return WorkerTask(stage=DETECTIONS, shards=["shard-00000"], storage="/nonexistent")


def test_a_bad_gpu_count_fails_the_step_once(tmp_path):
    """Configuration errors fail once: a retry would meet the same setting (allow_retries=False)."""
    from dagster import Failure, build_asset_context

    from resources.workers import LocalModelWorkers

    workers = LocalModelWorkers(python=sys.executable, gpus="two", lease_dir=str(tmp_path))
    with pytest.raises(Failure) as failed:
        workers.run(build_asset_context(), _worker_task(), {})
    assert failed.value.allow_retries is False
    assert "must be a whole number of GPUs, got 'two'" in failed.value.description


def test_no_free_gpu_after_the_timeout_fails_the_step_once(tmp_path):
    """Every GPU leased by another step for longer than lease_timeout_s: one failure that says what to do,
    not a retry that would wait as long again."""
    from dagster import Failure, build_asset_context

    from resources.workers import LocalModelWorkers

    workers = LocalModelWorkers(python=sys.executable, gpus="1", lease_dir=str(tmp_path), lease_timeout_s=0.3)
    with lease_gpu(1, tmp_path), pytest.raises(Failure) as failed:
        workers.run(build_asset_context(), _worker_task(), {})
    assert failed.value.allow_retries is False
    assert "stayed leased" in failed.value.description and "pseudolabel gpu-pool" in failed.value.description
