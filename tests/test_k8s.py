"""GPU steps as Kubernetes pods: the job spec dagster-k8s builds asks for a GPU on a GPU node."""

import json
import os
import subprocess
import sys

import pytest
from dagster_k8s.job import DagsterK8sJobConfig, construct_dagster_k8s_job, get_user_defined_k8s_config

from dagster_project.definitions import defs
from dagster_project.k8s import gpu_k8s_config


def build_step_job(asset_name: str):
    op_tags = defs.get_assets_def(asset_name).op.tags
    user_config = get_user_defined_k8s_config(op_tags)
    job_config = DagsterK8sJobConfig(
        job_image="registry.example.com/pseudolabel:test",
        dagster_home="/opt/dagster/dagster_home",
        instance_config_map="dagster-instance",
    )
    return construct_dagster_k8s_job(
        job_config, ["dagster", "api", "execute_step"], f"dagster-step-{asset_name}", user_defined_k8s_config=user_config
    )


@pytest.mark.parametrize("asset_name", ["detections", "masks"])
def test_gpu_step_job_requests_one_gpu_on_a_gpu_node(asset_name):
    pod = build_step_job(asset_name).spec.template.spec
    resources = pod.containers[0].resources
    assert resources.limits["nvidia.com/gpu"] == "1"
    assert resources.requests["nvidia.com/gpu"] == "1"
    assert pod.node_selector == {"nvidia.com/gpu.present": "true"}
    assert any(t.key == "nvidia.com/gpu" and t.effect == "NoSchedule" for t in pod.tolerations)


def test_cpu_steps_do_not_request_gpus():
    pod = build_step_job("normalized_images").spec.template.spec
    limits = pod.containers[0].resources.limits or {}
    assert "nvidia.com/gpu" not in limits


def test_gpu_placement_is_configurable_from_the_environment():
    config = gpu_k8s_config(
        {
            "PSEUDOLABEL_GPU_NODE_SELECTOR": json.dumps({"cloud.google.com/gke-accelerator": "nvidia-h100-80gb"}),
            "PSEUDOLABEL_GPU_TOLERATIONS": "[]",
            "PSEUDOLABEL_GPU_POD_MEMORY": "96Gi",
        }
    )
    assert config["pod_spec_config"]["node_selector"] == {"cloud.google.com/gke-accelerator": "nvidia-h100-80gb"}
    assert config["pod_spec_config"]["tolerations"] == []
    assert config["container_config"]["resources"]["limits"]["memory"] == "96Gi"
    with pytest.raises(ValueError, match="must be JSON"):
        gpu_k8s_config({"PSEUDOLABEL_GPU_TOLERATIONS": "not json"})


@pytest.mark.parametrize(("choice", "expected"), [("k8s", "k8s"), ("multiprocess", "multiprocess")])
def test_definitions_pick_the_executor_from_the_environment(choice, expected):
    code = "from dagster_project.definitions import defs; print(defs.executor.name)"
    env = {**os.environ, "PSEUDOLABEL_EXECUTOR": choice}
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, check=True)
    assert out.stdout.strip().splitlines()[-1] == expected


def test_network_and_gpu_assets_declare_retry_and_backfill_policies(monkeypatch):
    import importlib

    import dagster_project.policies as policies

    monkeypatch.delenv("PSEUDOLABEL_STEP_RETRIES")
    assert importlib.reload(policies).GPU_RETRY.max_retries == 2  # the production default
    monkeypatch.setenv("PSEUDOLABEL_STEP_RETRIES", "0")
    importlib.reload(policies)
    for name in ("catalog_snapshot", "normalized_images", "detections", "masks"):
        assert defs.get_assets_def(name).op.retry_policy is not None, name
    for name in ("normalized_images", "detections", "masks"):
        assert defs.get_assets_def(name).backfill_policy.max_partitions_per_run == 1, name
    assert defs.get_assets_def("pseudo_labels").backfill_policy.max_partitions_per_run is None  # single run
    assert defs.get_assets_def("detections").op.pool == "gpu"
