"""SAM 3's worker environment: its own extra and interpreter override, and the worker-side SAM 3 suite
(tests/worker_sam3/) on that interpreter, as part of the one test command. It must pass with no test
skipped."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
from worker_helpers import run_worker_suite

from pseudolabel.models.loading import DetectorSpec
from pseudolabel.workers.environment import (
    PYTHON_ENV,
    built_worker_python,
    ensure_worker_python,
    environment_key,
    python_env_var,
    source_path_entry,
    worker_requirements,
)
from pseudolabel.workers.task import DETECTIONS, WorkerTask
from resources.workers import LocalModelWorkers

TESTS = Path(__file__).resolve().parent


def _names(requirements: list[str]) -> set[str]:
    return {re.match(r"[A-Za-z0-9_.\-]+", r).group(0).lower() for r in requirements}


def test_the_sam3_environment_has_transformers_5_and_no_grounding_dino():
    sam3, worker = worker_requirements(("worker-sam3",)), worker_requirements(("worker",))
    assert {"torch", "torchvision", "transformers", "dagster-pipes", "pyarrow"} <= _names(sam3)
    assert not {"groundingdino-py", "sam2", "dagster", "pytest"} & _names(sam3)
    assert "transformers<6,>=5.0" in sam3 and "transformers<5,>=4.57" in worker
    assert environment_key(sam3) != environment_key(worker)


def test_each_environment_has_its_own_interpreter_override(monkeypatch, tmp_path):
    assert python_env_var("worker") == PYTHON_ENV == "PSEUDOLABEL_WORKER_PYTHON"
    assert python_env_var("worker-sam3") == "PSEUDOLABEL_WORKER_PYTHON_SAM3"
    assert python_env_var("worker-foo.bar") == "PSEUDOLABEL_WORKER_PYTHON_FOO_BAR"
    monkeypatch.setenv("PSEUDOLABEL_WORKER_HOME", str(tmp_path))
    monkeypatch.setenv(PYTHON_ENV, sys.executable)
    monkeypatch.delenv("PSEUDOLABEL_WORKER_PYTHON_SAM3", raising=False)
    never = lambda line: pytest.fail(f"built an environment: {line}")  # noqa: E731
    assert ensure_worker_python(("worker", "worker-test"), log=never) == sys.executable
    # The worker override does not reach the sam3 environment (not built under this home: none).
    assert built_worker_python(("worker",)) == sys.executable
    assert built_worker_python(("worker-sam3", "worker-test")) is None
    monkeypatch.setenv("PSEUDOLABEL_WORKER_PYTHON_SAM3", sys.executable)
    monkeypatch.delenv(PYTHON_ENV)
    assert ensure_worker_python(("worker-sam3",), log=never) == sys.executable
    assert built_worker_python(("worker",)) is None
    monkeypatch.setenv("PSEUDOLABEL_WORKER_PYTHON_SAM3", str(tmp_path / "missing" / "python"))
    with pytest.raises(RuntimeError, match="PSEUDOLABEL_WORKER_PYTHON_SAM3"):
        ensure_worker_python(("worker-sam3",), log=never)


def test_local_workers_pick_each_tasks_environment(monkeypatch, tmp_path):
    monkeypatch.setenv("PSEUDOLABEL_WORKER_HOME", str(tmp_path))
    monkeypatch.setenv("PSEUDOLABEL_WORKER_PYTHON_SAM3", sys.executable)
    detector = lambda backend: DetectorSpec(backend=backend).to_dict()  # noqa: E731
    sam3 = WorkerTask(DETECTIONS, ["shard-00000"], str(tmp_path), detector=detector("sam3"))
    fake = WorkerTask(DETECTIONS, ["shard-00000"], str(tmp_path), detector=detector("fake"))
    assert sam3.environment == "worker-sam3" and fake.environment is None
    workers = LocalModelWorkers(python="/opt/worker/bin/python")  # the "worker" environment's only
    assert workers.interpreter(sam3) == sys.executable
    assert workers.interpreter(fake) == "/opt/worker/bin/python"
    own = LocalModelWorkers(pythons={"worker-sam3": "/opt/sam3/bin/python"})
    assert own.interpreter(sam3) == "/opt/sam3/bin/python"


def test_sam3_suite_passes_in_the_sam3_worker_environment(sam3_worker_python):
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([source_path_entry(), str(TESTS)])}
    probe = subprocess.run(
        [sam3_worker_python, "-c", "import transformers; print(transformers.__version__)"],
        env=env,
        capture_output=True,
        text=True,
    )
    assert probe.returncode == 0 and int(probe.stdout.split(".")[0]) >= 5, probe.stderr[-2000:]
    run_worker_suite(sam3_worker_python, "worker_sam3", min_passed=6)


def test_a_task_whose_models_need_two_environments_is_refused_with_both_named(tmp_path):
    from pseudolabel.models.loading import ModelConfigError, SegmenterSpec
    from pseudolabel.workers.task import GOLD_CANDIDATES

    task = WorkerTask(
        GOLD_CANDIDATES,
        ["gold"],
        str(tmp_path),
        detector=DetectorSpec(backend="sam3").to_dict(),
        segmenter=SegmenterSpec(backend="sam2").to_dict(),
    )
    with pytest.raises(ModelConfigError, match=r"sam3 -> worker-sam3, sam2 -> worker.*one worker runs one"):
        LocalModelWorkers().interpreter(task)
