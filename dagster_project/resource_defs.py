"""The resources the code location runs with, chosen from the environment.

``PSEUDOLABEL_MODELS`` picks the model preset when a GPU step runs (see :mod:`resources.models`):
``official`` (default; checkpoints from the release URLs, verified and cached), ``random`` (SMOKE RUN:
the real architectures at tiny size with random weights, no downloads, says nothing about quality) or
``fake`` (instant deterministic stand-ins).
``PSEUDOLABEL_EXECUTOR=k8s`` runs model workers as GPU pods from ``PSEUDOLABEL_WORKER_IMAGE``;
otherwise they are local subprocesses, one per leased GPU.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from typing import Any

from dagster_project.k8s import EXECUTOR_ENV
from resources.catalog import catalog_from_env
from resources.models import StageSettingsResource, model_resources
from resources.storage import storage_from_env
from resources.workers import K8sModelWorkers, LocalModelWorkers, ModelWorkersResource

WORKER_IMAGE_ENV = "PSEUDOLABEL_WORKER_IMAGE"
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
        "stage_settings": StageSettingsResource(),
        "model_workers": model_workers_from_env(environ),
    }
