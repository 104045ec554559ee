"""The resources and the executor the code location runs with, chosen from the environment.

``PSEUDOLABEL_MODELS`` picks the model preset when a GPU step runs (see :mod:`resources.models`):
``official`` (default; checkpoints from the release URLs, verified and cached), ``random`` (SMOKE RUN:
the real architectures at tiny size with random weights, no downloads, says nothing about quality) or
``fake`` (instant deterministic stand-ins).
``PSEUDOLABEL_EXECUTOR=k8s`` runs model workers as GPU pods from ``PSEUDOLABEL_WORKER_IMAGE``;
otherwise they are local subprocesses, one per leased GPU. The same variable selects
``k8s_job_executor`` (one pod per step; step pods only orchestrate, GPU work runs in the worker pods,
see :mod:`resources.k8s`); anything else keeps the local multiprocess executor.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from typing import Any

from dagster import ExecutorDefinition, multiprocess_executor

from resources.catalog import catalog_from_env
from resources.k8s import WORKER_IMAGE_ENV  # the worker image's variable, named once
from resources.label_studio import label_studio_from_env
from resources.models import StageSettingsResource, TrackerResource, model_resources
from resources.storage import storage_from_env
from resources.thresholds import ThresholdsResource
from resources.workers import K8sModelWorkers, LocalModelWorkers, ModelWorkersResource

EXECUTOR_ENV = "PSEUDOLABEL_EXECUTOR"
WORKER_SECRETS_ENV = "PSEUDOLABEL_WORKER_SECRETS"  # comma-separated Kubernetes secret names
WORKER_NAMESPACE_ENV = "PSEUDOLABEL_WORKER_NAMESPACE"


def model_workers_from_env(environ: Mapping[str, str]) -> ModelWorkersResource:
    if environ.get(EXECUTOR_ENV, "").strip().lower() != "k8s":
        return LocalModelWorkers()
    image = environ.get(WORKER_IMAGE_ENV, "").strip()
    if not image:
        raise ValueError(
            f"{EXECUTOR_ENV}=k8s needs {WORKER_IMAGE_ENV}: the CUDA worker image to run GPU steps in"
        )
    secrets = [name.strip() for name in environ.get(WORKER_SECRETS_ENV, "").split(",") if name.strip()]
    return K8sModelWorkers(
        image=image, env_secrets=secrets, namespace=environ.get(WORKER_NAMESPACE_ENV, "").strip()
    )


def resources_from_env(environ: Mapping[str, str] | None = None) -> dict[str, Any]:
    environ = os.environ if environ is None else environ
    detector, segmenter = model_resources()  # the preset is read from the environment when a step runs
    return {
        "storage": storage_from_env(dict(environ)),
        "catalog": catalog_from_env(),
        "detector": detector,
        "segmenter": segmenter,
        "tracker": TrackerResource(),
        "stage_settings": StageSettingsResource(),
        "thresholds": ThresholdsResource(),
        "model_workers": model_workers_from_env(environ),
        "label_studio": label_studio_from_env(),
    }


def executor_from_env(environ: Mapping[str, str] | None = None) -> ExecutorDefinition:
    environ = os.environ if environ is None else environ
    choice = environ.get(EXECUTOR_ENV, "multiprocess").strip().lower()
    if choice == "k8s":
        from dagster_k8s import k8s_job_executor  # the kubernetes client loads only where it is used

        return k8s_job_executor
    if choice in ("", "multiprocess"):
        return multiprocess_executor
    raise ValueError(f"{EXECUTOR_ENV} must be 'multiprocess' or 'k8s', got {choice!r}")
