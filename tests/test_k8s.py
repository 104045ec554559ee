"""Kubernetes: the executor choice, and the model-worker pod a GPU step submits (no cluster needed).

Step pods only orchestrate and ask for no GPU; each GPU step starts one model-worker pod from the worker
image through ``PipesK8sClient``. The pod tests build the pod body the way dagster-k8s does, or run
:class:`K8sModelWorkers` end to end against a stand-in Kubernetes API whose "pod" is a local process
speaking Dagster Pipes.
"""

import json
import os
import subprocess
import sys
from contextlib import contextmanager
from pathlib import Path

import pytest
from dagster import (
    AssetExecutionContext,
    DagsterEventType,
    MaterializeResult,
    StaticPartitionsDefinition,
    asset,
    materialize,
)
from dagster._core.pipes.utils import extract_message_or_forward_to_stdout
from dagster_k8s import PipesK8sClient
from dagster_k8s import pipes as k8s_pipes
from dagster_k8s.client import DagsterK8sError, WaitForPodState
from dagster_k8s.job import DagsterK8sJobConfig, construct_dagster_k8s_job, get_user_defined_k8s_config
from dagster_pipes import DAGSTER_PIPES_CONTEXT_ENV_VAR, decode_env_var
from kubernetes.client import ApiClient

from dagster_project.definitions import defs as load_definitions
from dagster_project.resource_defs import model_workers_from_env
from pseudolabel.models.loading import DetectorSpec
from pseudolabel.workers.task import DETECTIONS, WorkerTask
from resources.k8s import plain_pod_env, worker_image_env, worker_pod_spec
from resources.workers import K8sModelWorkers, ModelWorkersResource

IMAGE = "registry.example.com/pseudolabel-worker:test"
SAM3_IMAGE = "registry.example.com/pseudolabel-worker-sam3:test"
DEPLOY = Path(__file__).resolve().parents[1] / "deploy"
defs = load_definitions()
SECRET_VALUE = "wJalrXUtnFEMI-not-a-real-key"
GPU_ENV = (
    "PSEUDOLABEL_GPU_NODE_SELECTOR",
    "PSEUDOLABEL_GPU_TOLERATIONS",
    "PSEUDOLABEL_GPU_POD_CPU",
    "PSEUDOLABEL_GPU_POD_MEMORY",
)


@pytest.fixture(autouse=True)
def gpu_env_defaults(monkeypatch):
    for name in GPU_ENV:
        monkeypatch.delenv(name, raising=False)


# --- the executor and the step pods --------------------------------------------------------------------


@pytest.mark.parametrize(("choice", "expected"), [("k8s", "k8s"), ("multiprocess", "multiprocess")])
def test_definitions_pick_the_executor_from_the_environment(choice, expected):
    code = "from dagster_project.definitions import defs; print(defs().executor.name)"
    env = {**os.environ, "PSEUDOLABEL_EXECUTOR": choice, "PSEUDOLABEL_WORKER_IMAGE": IMAGE}
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, check=True)
    assert out.stdout.strip().splitlines()[-1] == expected


@pytest.mark.parametrize("asset_name", ["detections", "masks", "normalized_images"])
def test_step_pods_ask_for_no_gpu(asset_name):
    """GPU steps' own pods only orchestrate the worker pod: no GPU, no GPU-node placement."""
    user_config = get_user_defined_k8s_config(defs.get_assets_def(asset_name).op.tags)
    job_config = DagsterK8sJobConfig(
        job_image="registry.example.com/pseudolabel:test",
        dagster_home="/opt/dagster/dagster_home",
        instance_config_map="dagster-instance",
    )
    job = construct_dagster_k8s_job(
        job_config,
        ["dagster", "api", "execute_step"],
        f"step-{asset_name}",
        user_defined_k8s_config=user_config,
    )
    pod = job.spec.template.spec
    resources = pod.containers[0].resources
    assert "nvidia.com/gpu" not in ((resources.limits or {}) | (resources.requests or {}))
    assert not pod.tolerations and not pod.node_selector


def test_k8s_model_workers_need_an_image():
    with pytest.raises(ValueError, match="PSEUDOLABEL_WORKER_IMAGE"):
        model_workers_from_env({"PSEUDOLABEL_EXECUTOR": "k8s"})
    workers = model_workers_from_env(
        {
            "PSEUDOLABEL_EXECUTOR": "k8s",
            "PSEUDOLABEL_WORKER_IMAGE": IMAGE,
            "PSEUDOLABEL_WORKER_SECRETS": "pseudolabel-aws, pseudolabel-hf",
        }
    )
    assert isinstance(workers, K8sModelWorkers)
    assert workers.image == IMAGE and workers.env_secrets == ["pseudolabel-aws", "pseudolabel-hf"]


def test_network_and_gpu_assets_declare_retry_and_backfill_policies(monkeypatch):
    from assets import common

    monkeypatch.delenv("PSEUDOLABEL_STEP_RETRIES")
    assert common.gpu_retry().max_retries == 2  # the production default
    assert common.network_retry().max_retries == 3
    monkeypatch.setenv("PSEUDOLABEL_SHARDS_PER_RUN", "zero")
    with pytest.raises(ValueError, match="PSEUDOLABEL_SHARDS_PER_RUN"):
        common.shards_per_run()
    monkeypatch.delenv("PSEUDOLABEL_SHARDS_PER_RUN")
    for name in ("catalog_snapshot", "normalized_images", "detections", "masks"):
        assert defs.get_assets_def(name).op.retry_policy is not None, name
    shards_per_run = common.shards_per_run().max_partitions_per_run
    assert shards_per_run == 10
    for name in ("normalized_images", "detections", "masks"):
        assert defs.get_assets_def(name).backfill_policy.max_partitions_per_run == shards_per_run, name
    assert defs.get_assets_def("pseudo_labels").backfill_policy.max_partitions_per_run is None  # single run
    assert defs.get_assets_def("detections").op.pool == "gpu"


# --- the worker pod spec ---------------------------------------------------------------------------------


def test_worker_pod_spec_runs_the_worker_on_one_gpu_on_a_gpu_node():
    spec = worker_pod_spec(IMAGE, ["pseudolabel-aws", "pseudolabel-hf"], service_account="worker", environ={})
    (container,) = spec["containers"]
    assert container["image"] == IMAGE
    assert container["command"] == ["python", "-m", "pseudolabel.workers"]
    assert container["resources"] == {
        "requests": {"cpu": "8", "memory": "48Gi", "nvidia.com/gpu": "1"},
        "limits": {"memory": "48Gi", "nvidia.com/gpu": "1"},
    }
    assert container["envFrom"] == [
        {"secretRef": {"name": "pseudolabel-aws"}},
        {"secretRef": {"name": "pseudolabel-hf"}},
    ]
    assert "env" not in container
    assert spec["nodeSelector"] == {"nvidia.com/gpu.present": "true"}
    assert spec["tolerations"] == [{"key": "nvidia.com/gpu", "operator": "Exists", "effect": "NoSchedule"}]
    assert spec["serviceAccountName"] == "worker"
    assert spec["restartPolicy"] == "Never"


def test_worker_pod_placement_and_size_come_from_the_environment(monkeypatch):
    monkeypatch.setenv(
        "PSEUDOLABEL_GPU_NODE_SELECTOR", json.dumps({"cloud.google.com/gke-accelerator": "h100"})
    )
    monkeypatch.setenv("PSEUDOLABEL_GPU_TOLERATIONS", "[]")
    monkeypatch.setenv("PSEUDOLABEL_GPU_POD_CPU", "12")
    monkeypatch.setenv("PSEUDOLABEL_GPU_POD_MEMORY", "96Gi")
    spec = K8sModelWorkers(image=IMAGE).pod_spec()  # reads this process's environment
    assert spec["nodeSelector"] == {"cloud.google.com/gke-accelerator": "h100"}
    assert spec["tolerations"] == []
    resources = spec["containers"][0]["resources"]
    assert resources["requests"] == {"cpu": "12", "memory": "96Gi", "nvidia.com/gpu": "1"}
    assert resources["limits"] == {"memory": "96Gi", "nvidia.com/gpu": "1"}
    assert "serviceAccountName" not in spec and "envFrom" not in spec["containers"][0]

    with pytest.raises(ValueError, match="must be JSON"):
        worker_pod_spec(IMAGE, environ={"PSEUDOLABEL_GPU_TOLERATIONS": "not json"})
    with pytest.raises(ValueError, match="JSON object"):
        worker_pod_spec(IMAGE, environ={"PSEUDOLABEL_GPU_NODE_SELECTOR": '["gpu"]'})


def test_credentials_never_go_into_the_pod_as_plain_values():
    env = {
        "AWS_ENDPOINT_URL": "http://minio:9000",
        "AWS_DEFAULT_REGION": "us-east-1",
        "AWS_ACCESS_KEY_ID": "AKIA-not-real",
        "AWS_SECRET_ACCESS_KEY": SECRET_VALUE,
        "AWS_SESSION_TOKEN": "token",
        "PSEUDOLABEL_CATALOG_TOKEN": "token",
    }
    plain, dropped = plain_pod_env(env)
    assert plain == {"AWS_ENDPOINT_URL": "http://minio:9000", "AWS_DEFAULT_REGION": "us-east-1"}
    assert dropped == [
        "AWS_ACCESS_KEY_ID",
        "AWS_SECRET_ACCESS_KEY",
        "AWS_SESSION_TOKEN",
        "PSEUDOLABEL_CATALOG_TOKEN",
    ]


def test_the_pod_body_dagster_k8s_builds_has_the_gpu_and_no_secret_values(monkeypatch):
    """``build_pod_body`` is what ``PipesK8sClient.run`` submits: check the real V1Pod."""
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", SECRET_VALUE)
    monkeypatch.setenv("PSEUDOLABEL_GPU_NODE_SELECTOR", json.dumps({"pool": "a100"}))
    workers = K8sModelWorkers(image=IMAGE, env_secrets=["pseudolabel-aws"], service_account="worker")
    plain, _ = plain_pod_env({"AWS_ENDPOINT_URL": "http://minio:9000", "AWS_SECRET_ACCESS_KEY": SECRET_VALUE})
    body = k8s_pipes.build_pod_body(
        pod_name="dagster-run-detections-0",
        image=None,
        command=None,
        env_vars={DAGSTER_PIPES_CONTEXT_ENV_VAR: "ctx", **plain},
        base_pod_meta={"labels": {"app.kubernetes.io/component": "model-worker"}},
        base_pod_spec=workers.pod_spec(),
    )
    (container,) = body.spec.containers
    assert container.image == IMAGE
    assert container.command == ["python", "-m", "pseudolabel.workers"]
    assert container.resources.requests["nvidia.com/gpu"] == "1"
    assert container.resources.limits["nvidia.com/gpu"] == "1"
    assert [source.secret_ref.name for source in container.env_from] == ["pseudolabel-aws"]
    assert {e.name: e.value for e in container.env} == {
        DAGSTER_PIPES_CONTEXT_ENV_VAR: "ctx",
        "AWS_ENDPOINT_URL": "http://minio:9000",
    }
    assert body.spec.node_selector == {"pool": "a100"}
    assert body.spec.tolerations[0].key == "nvidia.com/gpu"
    assert body.spec.service_account_name == "worker"
    assert body.spec.restart_policy == "Never"
    assert SECRET_VALUE not in json.dumps(ApiClient().sanitize_for_serialization(body))


# --- K8sModelWorkers.run against a stand-in Kubernetes API ----------------------------------------------

# What the "pod" runs: a stand-in worker speaking Dagster Pipes on stderr, like pseudolabel.workers.
FAKE_WORKER = """
import os, sys
from dagster_pipes import open_dagster_pipes
with open_dagster_pipes() as pipes:
    for shard in pipes.extras["task"]["shards"]:
        pipes.report_custom_message({"event": "shard_started", "shard": shard})
        if os.environ.get("FAIL_WITH"):
            pipes.report_custom_message(
                {"event": "failed", "shard": shard, "kind": os.environ["FAIL_WITH"], "message": "it broke"}
            )
            sys.exit(1)
        metadata = {"images": {"type": "int", "raw_value": 4}}
        pipes.report_custom_message({"event": "shard_done", "shard": shard, "metadata": metadata})
"""


class FakeCoreApi:
    def __init__(self):
        self.created, self.deleted = [], []

    def create_namespaced_pod(self, namespace, body):
        self.created.append((namespace, body))

    def delete_namespaced_pod(self, name, namespace):
        self.deleted.append(name)


class FakeKubernetes:
    """The part of ``DagsterKubernetesClient`` that ``PipesK8sClient.run`` uses; the pod's container
    is a local process started with the pod body's environment."""

    def __init__(self, fail_with: str = ""):
        self.core_api = FakeCoreApi()
        self.fail_with = fail_with
        self.exit_code = None

    def run_pod(self, handler) -> None:
        _, body = self.core_api.created[-1]
        env = {"PATH": os.environ["PATH"], **{e.name: e.value for e in body.spec.containers[0].env}}
        if self.fail_with:
            env["FAIL_WITH"] = self.fail_with
        proc = subprocess.run([sys.executable, "-c", FAKE_WORKER], env=env, capture_output=True, text=True)
        self.exit_code = proc.returncode
        for line in proc.stderr.splitlines():
            extract_message_or_forward_to_stdout(handler, line)

    def wait_for_pod(self, pod_name, namespace, wait_for_state=None, **kwargs):
        if wait_for_state == WaitForPodState.Terminated and self.exit_code:
            raise DagsterK8sError(f"Pod {pod_name} terminated but some containers exited with errors")


@pytest.fixture
def fake_kubernetes(monkeypatch):
    fake = FakeKubernetes()

    @contextmanager
    def consume_pod_logs(self, context, client, namespace, pod_name, **kwargs):
        client.run_pod(self.message_reader.handler)
        yield

    monkeypatch.setattr(PipesK8sClient, "_load_k8s_config", lambda self: None)
    monkeypatch.setattr(PipesK8sClient, "consume_pod_logs", consume_pod_logs)
    monkeypatch.setattr(k8s_pipes.DagsterKubernetesClient, "production_client", staticmethod(lambda: fake))
    return fake


SHARDS = StaticPartitionsDefinition(["shard-00000", "shard-00001"])


@asset(partitions_def=SHARDS, name="detections")
def gpu_stage(context: AssetExecutionContext, model_workers: ModelWorkersResource) -> MaterializeResult:
    task = WorkerTask(stage=DETECTIONS, shards=list(context.partition_keys), storage="s3://bucket/prefix")
    env = {"AWS_ENDPOINT_URL": "http://minio:9000", "AWS_SECRET_ACCESS_KEY": SECRET_VALUE}
    model_workers.run(context, task, env)
    return MaterializeResult()


def materialize_on_k8s(**kwargs):
    workers = K8sModelWorkers(image=IMAGE, namespace="pipeline", env_secrets=["pseudolabel-aws"])
    return materialize(
        [gpu_stage], partition_key="shard-00001", resources={"model_workers": workers}, **kwargs
    )


def test_k8s_model_workers_submit_one_gpu_pod_and_record_its_shards(fake_kubernetes, monkeypatch):
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", SECRET_VALUE)
    result = materialize_on_k8s()
    assert result.success

    ((namespace, body),) = fake_kubernetes.core_api.created
    assert namespace == "pipeline"
    assert fake_kubernetes.core_api.deleted == [body.metadata.name]
    (container,) = body.spec.containers
    assert container.image == IMAGE and container.command == ["python", "-m", "pseudolabel.workers"]
    assert container.resources.limits["nvidia.com/gpu"] == "1"
    assert [source.secret_ref.name for source in container.env_from] == ["pseudolabel-aws"]
    assert body.metadata.labels["app.kubernetes.io/component"] == "model-worker"
    assert body.metadata.labels["dagster/run-id"] == result.run_id
    serialized = json.dumps(ApiClient().sanitize_for_serialization(body))
    assert SECRET_VALUE not in serialized and "AWS_SECRET_ACCESS_KEY" not in serialized
    env = {e.name: e.value for e in container.env}
    assert env["AWS_ENDPOINT_URL"] == "http://minio:9000"
    pipes_context = decode_env_var(env[DAGSTER_PIPES_CONTEXT_ENV_VAR])["data"]  # injected directly
    assert pipes_context["extras"]["task"]["shards"] == ["shard-00001"]
    assert SECRET_VALUE not in json.dumps(pipes_context)

    (materialization,) = result.asset_materializations_for_node("detections")
    assert materialization.partition == "shard-00001"
    assert materialization.metadata["images"].value == 4


@pytest.mark.parametrize(("kind", "retryable"), [("oom", True), ("config", False)])
def test_a_failed_worker_pod_fails_the_step_with_the_workers_report(fake_kubernetes, kind, retryable):
    fake_kubernetes.fail_with = kind
    result = materialize_on_k8s(raise_on_error=False)
    assert not result.success
    (failure,) = [e for e in result.all_events if e.event_type == DagsterEventType.STEP_FAILURE]
    message = failure.step_failure_data.user_failure_data.description
    assert "while processing shard-00001: it broke" in message
    assert ("A retry may succeed" in message) is retryable
    assert fake_kubernetes.core_api.deleted  # the failed pod is cleaned up


def test_a_pod_that_cannot_be_created_fails_once_with_a_clear_message(fake_kubernetes, monkeypatch):
    from kubernetes.client.exceptions import ApiException

    def forbidden(namespace, body):
        raise ApiException(status=403, reason="Forbidden: cannot create pods in namespace pipeline")

    monkeypatch.setattr(fake_kubernetes.core_api, "create_namespaced_pod", forbidden)
    result = materialize_on_k8s(raise_on_error=False)
    (failure,) = [e for e in result.all_events if e.event_type == DagsterEventType.STEP_FAILURE]
    message = failure.step_failure_data.user_failure_data.description
    assert IMAGE in message and "Forbidden" in message and "Retrying will not help" in message


def test_each_worker_environment_runs_in_its_own_image(monkeypatch):
    """SAM 3 (worker-sam3: transformers >= 5) never lands on the worker image (transformers 4)."""
    monkeypatch.delenv("PSEUDOLABEL_WORKER_IMAGE_SAM3", raising=False)
    assert worker_image_env("worker") == "PSEUDOLABEL_WORKER_IMAGE"
    assert worker_image_env("worker-sam3") == "PSEUDOLABEL_WORKER_IMAGE_SAM3"
    workers = K8sModelWorkers(image=IMAGE)
    assert workers.image_for(None) == workers.image_for("worker") == IMAGE  # None: no model stack needed
    with pytest.raises(
        ValueError, match=r"set PSEUDOLABEL_WORKER_IMAGE_SAM3 .*deploy/Dockerfile\.worker-sam3"
    ):
        workers.image_for("worker-sam3")
    monkeypatch.setenv("PSEUDOLABEL_WORKER_IMAGE_SAM3", SAM3_IMAGE)
    assert workers.pod_spec(environment="worker-sam3")["containers"][0]["image"] == SAM3_IMAGE
    assert workers.pod_spec()["containers"][0]["image"] == IMAGE
    configured = K8sModelWorkers(image=IMAGE, images={"worker-sam3": "registry.example.com/own:1"})
    assert configured.image_for("worker-sam3") == "registry.example.com/own:1"


SAM3_DETECTOR = DetectorSpec(backend="sam3", checkpoint="random", tiny=True).to_dict()


@asset(partitions_def=SHARDS, name="detections")
def sam3_stage(context: AssetExecutionContext, model_workers: ModelWorkersResource) -> MaterializeResult:
    task = WorkerTask(DETECTIONS, list(context.partition_keys), "s3://bucket/prefix", detector=SAM3_DETECTOR)
    model_workers.run(context, task, {})
    return MaterializeResult()


def test_a_sam3_step_submits_its_pod_from_the_sam3_image(fake_kubernetes, monkeypatch):
    workers = K8sModelWorkers(image=IMAGE)
    run = lambda: materialize(  # noqa: E731
        [sam3_stage], partition_key="shard-00000", resources={"model_workers": workers}, raise_on_error=False
    )
    monkeypatch.delenv("PSEUDOLABEL_WORKER_IMAGE_SAM3", raising=False)
    result = run()
    (failure,) = [e for e in result.all_events if e.event_type == DagsterEventType.STEP_FAILURE]
    message = failure.step_failure_data.user_failure_data.description
    assert "PSEUDOLABEL_WORKER_IMAGE_SAM3" in message and "Retrying will not help" in message
    assert not fake_kubernetes.core_api.created  # no pod from the wrong image

    monkeypatch.setenv("PSEUDOLABEL_WORKER_IMAGE_SAM3", SAM3_IMAGE)
    assert run().success
    ((_, body),) = fake_kubernetes.core_api.created
    assert body.spec.containers[0].image == SAM3_IMAGE


def test_the_sam3_worker_image_mirrors_the_worker_image():
    import yaml

    values = yaml.safe_load((DEPLOY / "values.yaml").read_text())
    (deployment,) = values["dagster-user-deployments"]["deployments"]
    env = {item["name"]: item["value"] for item in deployment["env"]}
    assert env["PSEUDOLABEL_WORKER_IMAGE_SAM3"].startswith("registry.example.com/pseudolabel-worker-sam3:")
    worker, sam3 = ((DEPLOY / name).read_text() for name in ("Dockerfile.worker", "Dockerfile.worker-sam3"))
    assert 'pip install ".[worker]"' in worker and 'pip install ".[worker-sam3]"' in sam3
    assert "PSEUDOLABEL_WORKER_PYTHON_SAM3=/opt/venv/bin/python" in sam3
    base = lambda text: next(line for line in text.splitlines() if line.startswith("FROM"))  # noqa: E731
    assert base(worker) == base(sam3)
    assert 'CMD ["python", "-m", "pseudolabel.workers"]' in sam3


def test_helm_values_put_postgres_where_the_chart_reads_it():
    """The official chart reads .Values.postgresql.* and .Values.global.postgresqlSecretName; the scheme
    names psycopg2 (dagster-postgres' driver), as the PostgreSQL `dagster dev` test uses."""
    import yaml

    values = yaml.safe_load((Path(__file__).resolve().parents[1] / "deploy" / "values.yaml").read_text())
    postgres = values["postgresql"]
    assert postgres["enabled"] is False and postgres["postgresqlScheme"] == "postgresql+psycopg2"
    assert {"postgresqlHost", "postgresqlUsername", "postgresqlDatabase"} <= postgres.keys()
    assert values["global"]["postgresqlSecretName"]
    assert not {k for k in values if k.startswith("postgresql") and k != "postgresql"} | {
        k for k in values if k.startswith("global_")
    }
    assert "password" not in yaml.safe_dump(postgres).lower()
