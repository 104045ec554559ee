"""The executor, chosen from the environment.

``PSEUDOLABEL_EXECUTOR=k8s`` selects ``k8s_job_executor`` (one pod per step); anything else keeps the
local multiprocess executor. Step pods only orchestrate: GPU work runs in model-worker pods that
:class:`resources.workers.K8sModelWorkers` starts (GPU requests and placement: :mod:`resources.k8s`).
"""

from __future__ import annotations

import os
from collections.abc import Mapping

from dagster import ExecutorDefinition, multiprocess_executor

EXECUTOR_ENV = "PSEUDOLABEL_EXECUTOR"


def executor_from_env(environ: Mapping[str, str] | None = None) -> ExecutorDefinition:
    environ = os.environ if environ is None else environ
    choice = environ.get(EXECUTOR_ENV, "multiprocess").strip().lower()
    if choice == "k8s":
        from dagster_k8s import k8s_job_executor  # the kubernetes client loads only where it is used

        return k8s_job_executor
    if choice in ("", "multiprocess"):
        return multiprocess_executor
    raise ValueError(f"{EXECUTOR_ENV} must be 'multiprocess' or 'k8s', got {choice!r}")
