"""The Kubernetes pod a model worker runs in: one GPU, placed on GPU nodes, secrets only from secrets.

Placement and size come from the environment, so a cluster can be targeted without code changes:

- ``PSEUDOLABEL_GPU_NODE_SELECTOR``: JSON object (default ``{"nvidia.com/gpu.present": "true"}``)
- ``PSEUDOLABEL_GPU_TOLERATIONS``: JSON list (default: tolerate the ``nvidia.com/gpu`` NoSchedule taint)
- ``PSEUDOLABEL_GPU_POD_CPU`` (default ``8``) and ``PSEUDOLABEL_GPU_POD_MEMORY`` (default ``48Gi``)

The image is per worker environment (pyproject extra, see :mod:`pseudolabel.workers.environment`):
``PSEUDOLABEL_WORKER_IMAGE`` (deploy/Dockerfile.worker) for ``worker`` and for tasks that need no model
stack, ``PSEUDOLABEL_WORKER_IMAGE_SAM3`` (deploy/Dockerfile.worker-sam3) for ``worker-sam3``: the same
naming rule as the interpreters' ``PSEUDOLABEL_WORKER_PYTHON[_SAM3]`` (:func:`worker_image_env`).

A worker pod never outlives its step for long: ``PipesK8sClient`` deletes it when the step ends, fails
or is interrupted; a step running in a pod owns its worker pods (:func:`owner_references`), so Kubernetes'
garbage collector deletes them with the step's pod (evicted, drained, its run's job cleaned up), even
after the step's process was killed outright; and ``activeDeadlineSeconds`` ends a worker pod that runs
longer than its step would wait for it. On Kubernetes the GPU is the pod's while the pod exists, so no
other step is given it before the worker is gone.

Pure functions over plain dicts: no cluster and no Kubernetes client needed.
"""

from __future__ import annotations

import json
import os
import re
from collections.abc import Mapping, Sequence
from typing import Any

from pseudolabel.workers.environment import DEFAULT_EXTRA, environment_suffix

WORKER_IMAGE_ENV = "PSEUDOLABEL_WORKER_IMAGE"  # the "worker" environment's image
GPU_NODE_SELECTOR_ENV = "PSEUDOLABEL_GPU_NODE_SELECTOR"  # JSON object
GPU_TOLERATIONS_ENV = "PSEUDOLABEL_GPU_TOLERATIONS"  # JSON list
GPU_POD_CPU_ENV = "PSEUDOLABEL_GPU_POD_CPU"
GPU_POD_MEMORY_ENV = "PSEUDOLABEL_GPU_POD_MEMORY"

DEFAULT_GPU_NODE_SELECTOR = {"nvidia.com/gpu.present": "true"}
DEFAULT_GPU_TOLERATIONS = [{"key": "nvidia.com/gpu", "operator": "Exists", "effect": "NoSchedule"}]
DEFAULT_GPU_POD_CPU = "8"
DEFAULT_GPU_POD_MEMORY = "48Gi"

WORKER_CONTAINER = "model-worker"
WORKER_COMMAND = ["python", "-m", "pseudolabel.workers"]

# Environment names that hold credentials: never passed to a pod as plain values.
_SECRET_NAME = re.compile(r"SECRET|TOKEN|PASSWORD|PASSWD|CREDENTIAL|ACCESS_KEY|API_KEY|PRIVATE_KEY")


def json_env(environ: Mapping[str, str], name: str, default: Any) -> Any:
    raw = environ.get(name, "").strip()
    if not raw:
        return default
    try:
        return json.loads(raw)
    except json.JSONDecodeError as exc:
        raise ValueError(f"{name} must be JSON, got {raw!r}: {exc}") from exc


def gpu_resources(environ: Mapping[str, str] | None = None) -> dict[str, dict[str, str]]:
    """Requests and limits of a worker container: one ``nvidia.com/gpu``, CPU and memory.

    CPU is requested but not limited (a CPU limit throttles image decoding); memory is both."""
    environ = os.environ if environ is None else environ
    cpu = environ.get(GPU_POD_CPU_ENV, "").strip() or DEFAULT_GPU_POD_CPU
    memory = environ.get(GPU_POD_MEMORY_ENV, "").strip() or DEFAULT_GPU_POD_MEMORY
    return {
        "requests": {"cpu": cpu, "memory": memory, "nvidia.com/gpu": "1"},
        "limits": {"memory": memory, "nvidia.com/gpu": "1"},
    }


def gpu_placement(environ: Mapping[str, str] | None = None) -> dict[str, Any]:
    """``nodeSelector`` and ``tolerations`` of a worker pod (pod-spec keys)."""
    environ = os.environ if environ is None else environ
    node_selector = json_env(environ, GPU_NODE_SELECTOR_ENV, DEFAULT_GPU_NODE_SELECTOR)
    tolerations = json_env(environ, GPU_TOLERATIONS_ENV, DEFAULT_GPU_TOLERATIONS)
    if not isinstance(node_selector, dict):
        raise ValueError(f"{GPU_NODE_SELECTOR_ENV} must be a JSON object, got {node_selector!r}")
    if not isinstance(tolerations, list):
        raise ValueError(f"{GPU_TOLERATIONS_ENV} must be a JSON list, got {tolerations!r}")
    return {"nodeSelector": node_selector, "tolerations": tolerations}


def worker_image_env(extra: str) -> str:
    """The variable naming the image of the worker environment ``extra``: ``PSEUDOLABEL_WORKER_IMAGE`` for
    ``worker``, ``PSEUDOLABEL_WORKER_IMAGE_SAM3`` for ``worker-sam3``."""
    return WORKER_IMAGE_ENV + environment_suffix(extra)


def worker_image(
    environment: str | None,
    default: str,
    images: Mapping[str, str] | None = None,
    environ: Mapping[str, str] | None = None,
) -> str:
    """The image a model worker for ``environment`` (a pyproject extra; None = no model stack) runs in:
    ``default`` for ``worker`` and None, else ``images[environment]`` or ``$PSEUDOLABEL_WORKER_IMAGE_<X>``.
    Never another environment's image: SAM 3 on the ``worker`` image would meet transformers 4."""
    if environment in (None, DEFAULT_EXTRA):
        return default
    environ = os.environ if environ is None else environ
    name = worker_image_env(environment)
    image = (images or {}).get(environment, "").strip() or environ.get(name, "").strip()
    if not image:
        raise ValueError(
            f"the models of this step run in the {environment!r} worker environment, which has its own "
            f"image: set {name} (or the model_workers resource's images[{environment!r}]) to an image "
            f"built from deploy/Dockerfile.{environment}"
        )
    return image


def worker_pod_spec(
    image: str,
    env_secrets: Sequence[str] = (),
    service_account: str = "",
    environ: Mapping[str, str] | None = None,
    active_deadline_s: float = 0,
) -> dict[str, Any]:
    """The pod spec (camelCase, as ``PipesK8sClient``'s ``base_pod_spec``) of one model worker.

    Its only container runs ``python -m pseudolabel.workers`` in ``image``. Credentials reach it only
    through ``envFrom`` references to the Kubernetes secrets ``env_secrets``; Dagster Pipes adds its
    bootstrap variables and the plain storage settings when the pod is built. With ``active_deadline_s``
    (> 0) the kubelet ends the pod after that many seconds (the step stops waiting for it then anyway)."""
    if not image:
        raise ValueError("a model-worker pod needs the worker image")
    container: dict[str, Any] = {
        "name": WORKER_CONTAINER,
        "image": image,
        "command": list(WORKER_COMMAND),
        "resources": gpu_resources(environ),
    }
    if env_secrets:
        container["envFrom"] = [{"secretRef": {"name": name}} for name in env_secrets]
    spec: dict[str, Any] = {
        "restartPolicy": "Never",  # a failed worker fails the step; Dagster's retry policy decides
        "containers": [container],
        **gpu_placement(environ),
    }
    if service_account:
        spec["serviceAccountName"] = service_account
    if active_deadline_s > 0:
        spec["activeDeadlineSeconds"] = max(1, int(active_deadline_s))
    return spec


def step_pod_name(environ: Mapping[str, str] | None = None) -> str | None:
    """The name of the pod this step runs in (the kubelet sets ``HOSTNAME`` to it), or None outside
    Kubernetes."""
    environ = os.environ if environ is None else environ
    if not environ.get("KUBERNETES_SERVICE_HOST", "").strip():
        return None
    return environ.get("HOSTNAME", "").strip() or None


def owner_references(pod_name: str, pod_uid: str) -> list[dict[str, Any]]:
    """``metadata.ownerReferences`` (camelCase) that make the pod ``pod_name`` (the step's) own a worker
    pod: deleting the step's pod deletes the worker's. Owner and worker must share a namespace."""
    if not pod_name or not pod_uid:
        raise ValueError("an owner reference needs the owner pod's name and uid")
    return [{"apiVersion": "v1", "kind": "Pod", "name": pod_name, "uid": pod_uid}]


def is_secret_name(name: str) -> bool:
    """Whether an environment variable name looks like it holds a credential."""
    return bool(_SECRET_NAME.search(name.upper()))


def plain_pod_env(env: Mapping[str, str]) -> tuple[dict[str, str], list[str]]:
    """Split ``env`` into what may go into a pod spec as plain values and the names left out
    (credentials: a pod gets those from its Kubernetes secrets)."""
    plain = {name: value for name, value in env.items() if not is_secret_name(name)}
    return plain, sorted(set(env) - set(plain))
