"""A model worker never outlives its step, and holds the step's GPU until it is gone.

A GPU step runs in a process of its own, with one (pretend) GPU and a real model worker (fake models);
the test SIGKILLs the step process: the worker must be gone within 5 s, and a second step waiting for the
GPU must not get it before the worker is gone. Twice: the worker started directly (the parent-death
signal ends it) and through an interpreter wrapper that survives the step (only the watchdog sees the
step die). Plus the Kubernetes side: worker pods owned by the step's pod and bounded by a deadline.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path
from types import SimpleNamespace

import pytest
from dagster import DagsterInstance
from dagster_k8s import pipes as k8s_pipes
from images import write_image_shard

from assets.common import SHARDS_PARTITIONS_NAME
from pseudolabel import layout
from pseudolabel.gpu_lease import NoFreeGpu, lease_gpu
from pseudolabel.storage import LocalObjectStore
from pseudolabel.testing.models import CALLS_LOG_ENV, forward_calls
from pseudolabel.workers.lifetime import process_token, watch_process
from pseudolabel.workers.task import DETECTIONS, WorkerTask
from resources.k8s import owner_references, step_pod_name, worker_pod_spec
from resources.workers import K8sModelWorkers

REPO = Path(__file__).resolve().parents[1]
TESTS = Path(__file__).resolve().parent
GONE_WITHIN_S = 5.0
EXIT_RACE_S = 0.1  # an exiting process closes its files (the lease) just before /proc shows it gone

# The step: one shard of detections in this process, on a host with 1 GPU (lease dir of the test).
STEP = """
import json, sys
from dagster import DagsterInstance
from worker_helpers import run
from assets.detections import detections
from pseudolabel.storage import LocalObjectStore
from resources.models import DetectorResource
from resources.workers import LocalModelWorkers

args = json.loads(sys.argv[1])
with DagsterInstance.from_config(args["home"]) as instance:
    run(
        LocalObjectStore(args["store"]),
        [detections],
        instance,
        detector=DetectorResource(backend="fake", seconds_per_image=0.3, batch_size=1),
        workers=LocalModelWorkers(gpus="1", lease_dir=args["locks"], python=args["python"]),
        shard=args["shard"],
    )
"""


def start_step(tmp_path: Path, python: str) -> tuple[subprocess.Popen, Path, Path]:
    """A GPU step in a process of its own, with a slow worker (30 images, 0.3 s each); returns the
    process, the lease dir and the forward-calls log."""
    store = LocalObjectStore(tmp_path / "data")
    shard = layout.shard_name(0)
    write_image_shard(store, shard, [(96, 64)] * 30)
    home, locks, calls = tmp_path / "home", tmp_path / "locks", tmp_path / "calls.jsonl"
    home.mkdir()
    with DagsterInstance.from_config(str(home)) as instance:
        instance.add_dynamic_partitions(SHARDS_PARTITIONS_NAME, [shard])
    args = {
        "home": str(home),
        "store": str(store.root),
        "locks": str(locks),
        "shard": shard,
        "python": python,
    }
    env = {
        **os.environ,
        "PYTHONPATH": os.pathsep.join([str(TESTS), str(REPO)]),
        CALLS_LOG_ENV: str(calls),
    }
    step = subprocess.Popen(
        [sys.executable, "-c", STEP, json.dumps(args)],
        env=env,
        cwd=REPO,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    return step, locks, calls


def running_worker(step: subprocess.Popen, calls: Path, timeout_s: float = 120) -> int:
    """The pid of the step's model worker once it runs its model."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        assert step.poll() is None, f"the step ended early ({step.returncode})"
        found = forward_calls(calls)
        if found:
            return found[0]["pid"]
        time.sleep(0.05)
    raise AssertionError("the model worker never started")


def wrapper_python(tmp_path: Path) -> str:
    """An interpreter wrapper that stays between the step and the worker (no exec), as ``conda run`` or
    a site's launcher script do: the worker's parent outlives the step."""
    wrapper = tmp_path / "python-wrapper"
    wrapper.write_text(f'#!/bin/sh\n"{sys.executable}" "$@"\n')
    wrapper.chmod(0o755)
    return str(wrapper)


@pytest.mark.parametrize("launch", ["direct", "wrapper"])
def test_a_killed_step_takes_its_worker_and_its_gpu_goes_to_the_next_step_only_after(tmp_path, launch):
    step, locks, calls = start_step(tmp_path, wrapper_python(tmp_path) if launch == "wrapper" else "")
    try:
        worker = running_worker(step, calls)
        with pytest.raises(NoFreeGpu), lease_gpu(1, locks, timeout_s=0):
            pass  # the step holds the GPU

        granted: dict[str, float | bool] = {}

        def second_step() -> None:  # waits for the GPU as the next step would
            with lease_gpu(1, locks, timeout_s=30, poll_s=0.005):
                granted["at"] = time.monotonic()
                until = granted["at"] + EXIT_RACE_S
                while process_token(worker) is not None and time.monotonic() < until:
                    time.sleep(0.001)
                granted["worker_alive"] = process_token(worker) is not None

        waiting = threading.Thread(target=second_step)
        waiting.start()
        time.sleep(0.2)
        assert not granted  # not while the step and its worker run
        os.kill(step.pid, signal.SIGKILL)
        killed = time.monotonic()
        while process_token(worker) is not None and time.monotonic() - killed < 30:
            time.sleep(0.005)
        gone = time.monotonic() - killed
        step.wait(10)
        waiting.join(30)
    finally:
        if step.poll() is None:
            step.kill()
            step.wait(10)
    print(
        f"{launch}: worker gone {gone:.3f}s after SIGKILL of its step; GPU leased again after "
        f"{granted['at'] - killed:.3f}s"
    )
    assert gone < GONE_WITHIN_S
    assert granted and granted["worker_alive"] is False  # the GPU went on only once the worker was gone
    assert len(forward_calls(calls)) < 30  # the worker stopped mid-shard


def test_the_watchdog_fires_when_the_watched_process_is_gone_and_at_once_if_it_already_is():
    sleeper = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    fired = threading.Event()
    watch_process(sleeper.pid, poll_s=0.02, on_gone=fired.set)
    assert not fired.wait(0.3)
    sleeper.kill()  # a zombie until reaped: gone all the same
    assert fired.wait(2)
    sleeper.wait()
    late = threading.Event()
    watch_process(sleeper.pid, poll_s=0.02, on_gone=late.set)
    assert late.wait(1)


# --- Kubernetes -----------------------------------------------------------------------------------------

IMAGE = "registry.example.com/pseudolabel-worker:test"


def test_worker_pods_are_bounded_by_the_time_the_step_waits_for_them():
    assert "activeDeadlineSeconds" not in worker_pod_spec(IMAGE, environ={})
    assert worker_pod_spec(IMAGE, environ={}, active_deadline_s=90.5)["activeDeadlineSeconds"] == 90
    spec = K8sModelWorkers(image=IMAGE, pod_wait_timeout_s=7200).pod_spec(environ={})
    assert spec["activeDeadlineSeconds"] == 7200


@pytest.fixture
def in_a_step_pod(monkeypatch):
    """This process as a step in pod "run-step-pod" of namespace "pipeline", with a Kubernetes API that
    knows that pod."""
    import kubernetes
    from dagster_k8s import client as k8s_client
    from dagster_k8s import utils as k8s_utils

    pods = {("pipeline", "run-step-pod"): SimpleNamespace(name="run-step-pod", uid="0b5e-41d")}

    def read_namespaced_pod(name, namespace):
        return SimpleNamespace(metadata=pods[(namespace, name)])

    api = SimpleNamespace(core_api=SimpleNamespace(read_namespaced_pod=read_namespaced_pod))
    monkeypatch.setenv("KUBERNETES_SERVICE_HOST", "10.0.0.1")
    monkeypatch.setenv("HOSTNAME", "run-step-pod")
    monkeypatch.setattr(k8s_utils, "detect_current_namespace", lambda kubeconfig_file: "pipeline")
    monkeypatch.setattr(kubernetes.config, "load_incluster_config", lambda: None)
    monkeypatch.setattr(k8s_client.DagsterKubernetesClient, "production_client", staticmethod(lambda: api))
    return pods


def test_a_worker_pod_is_owned_by_its_step_pod(in_a_step_pod):
    """Deleting the step's pod (evicted, drained, its run's job cleaned up) deletes the worker pod with
    it, even when the step's process was killed before ``PipesK8sClient`` could delete it."""
    warnings: list[str] = []
    log = SimpleNamespace(warning=warnings.append)
    workers = K8sModelWorkers(image=IMAGE)
    owners = workers.step_pod_owners(log)
    assert owners == [{"apiVersion": "v1", "kind": "Pod", "name": "run-step-pod", "uid": "0b5e-41d"}]
    task = WorkerTask(stage=DETECTIONS, shards=["shard-00000"], storage="s3://bucket/prefix")
    body = k8s_pipes.build_pod_body(  # what PipesK8sClient.run submits
        pod_name="dagster-run-detections-0",
        image=None,
        command=None,
        env_vars={},
        base_pod_meta=workers.pod_meta(SimpleNamespace(run_id="run-1"), task, owners),
        base_pod_spec=workers.pod_spec(environ={}),
    )
    (owner,) = body.metadata.owner_references
    assert (owner.kind, owner.name, owner.uid) == ("Pod", "run-step-pod", "0b5e-41d")
    assert body.spec.active_deadline_seconds == 86400
    # An owner must share its dependents' namespace; a pod that cannot be read leaves the worker unowned.
    assert K8sModelWorkers(image=IMAGE, namespace="elsewhere").step_pod_owners(log) == []
    in_a_step_pod.clear()
    assert workers.step_pod_owners(log) == [] and "run-step-pod" in warnings[-1]


def test_outside_kubernetes_there_is_no_step_pod():
    assert step_pod_name({"HOSTNAME": "laptop"}) is None
    assert step_pod_name({"KUBERNETES_SERVICE_HOST": "10.0.0.1", "HOSTNAME": "p-1"}) == "p-1"
    with pytest.raises(ValueError, match="uid"):
        owner_references("p-1", "")
