"""Running GPU steps as Kubernetes pods (dagster-k8s) with the same asset code.

``PSEUDOLABEL_EXECUTOR=k8s`` selects ``k8s_job_executor`` (one pod per step); anything else keeps the
local multiprocess executor. GPU assets carry a ``dagster-k8s/config`` tag that asks for one GPU and
lands on GPU nodes; the node selector and tolerations come from the environment so a cluster can be
targeted without code changes.
"""

from __future__ import annotations

import json
import os
from collections.abc import Mapping
from typing import Any

from dagster import ExecutorDefinition, multiprocess_executor
from dagster_k8s import k8s_job_executor

EXECUTOR_ENV = "PSEUDOLABEL_EXECUTOR"
GPU_NODE_SELECTOR_ENV = "PSEUDOLABEL_GPU_NODE_SELECTOR"  # JSON object
GPU_TOLERATIONS_ENV = "PSEUDOLABEL_GPU_TOLERATIONS"  # JSON list
GPU_POD_CPU_ENV = "PSEUDOLABEL_GPU_POD_CPU"
GPU_POD_MEMORY_ENV = "PSEUDOLABEL_GPU_POD_MEMORY"

DEFAULT_GPU_NODE_SELECTOR = {"nvidia.com/gpu.present": "true"}
DEFAULT_GPU_TOLERATIONS = [{"key": "nvidia.com/gpu", "operator": "Exists", "effect": "NoSchedule"}]


def _json_env(environ: Mapping[str, str], name: str, default: Any) -> Any:
    raw = environ.get(name, "").strip()
    if not raw:
        return default
    try:
        return json.loads(raw)
    except json.JSONDecodeError as exc:
        raise ValueError(f"{name} must be JSON, got {raw!r}: {exc}") from exc


def gpu_k8s_config(environ: Mapping[str, str] | None = None) -> dict[str, Any]:
    """The ``dagster-k8s/config`` of a GPU step: one ``nvidia.com/gpu`` plus placement on GPU nodes."""
    environ = os.environ if environ is None else environ
    cpu = environ.get(GPU_POD_CPU_ENV, "8")
    memory = environ.get(GPU_POD_MEMORY_ENV, "48Gi")
    return {
        "container_config": {
            "resources": {
                "requests": {"cpu": cpu, "memory": memory, "nvidia.com/gpu": "1"},
                "limits": {"memory": memory, "nvidia.com/gpu": "1"},
            }
        },
        "pod_spec_config": {
            "node_selector": _json_env(environ, GPU_NODE_SELECTOR_ENV, DEFAULT_GPU_NODE_SELECTOR),
            "tolerations": _json_env(environ, GPU_TOLERATIONS_ENV, DEFAULT_GPU_TOLERATIONS),
        },
    }


def gpu_op_tags(environ: Mapping[str, str] | None = None) -> dict[str, Any]:
    return {"dagster-k8s/config": gpu_k8s_config(environ)}


def executor_from_env(environ: Mapping[str, str] | None = None) -> ExecutorDefinition:
    environ = os.environ if environ is None else environ
    choice = environ.get(EXECUTOR_ENV, "multiprocess").strip().lower()
    if choice == "k8s":
        return k8s_job_executor
    if choice in ("", "multiprocess"):
        return multiprocess_executor
    raise ValueError(f"{EXECUTOR_ENV} must be 'multiprocess' or 'k8s', got {choice!r}")
