"""Where the GPU stages run: model workers driven through Dagster Pipes.

The orchestrator never imports torch. A GPU asset builds a :class:`WorkerTask` and hands it to the
``model_workers`` resource, which starts ``python -m pseudolabel.workers`` in the worker environment
and turns the worker's per-shard reports into one materialization per shard:

- :class:`LocalModelWorkers`: a subprocess on this host. Each step leases a free GPU (an ``flock`` per
  device) and hands the worker that one device as ``CUDA_VISIBLE_DEVICES``, so concurrent GPU steps
  never share a GPU by accident. The worker never outlives its step: it is killed when the step's
  process dies, however it dies, and it inherits the lease's descriptor, so the device stays leased
  until the worker is gone too (:mod:`pseudolabel.workers.lifetime`).
- :class:`K8sModelWorkers`: a GPU pod per step from the worker image (``PipesK8sClient``), deleted when
  the step ends or fails, owned by the step's pod (deleted with it) and bounded by a deadline.

Failures: a worker that reports a configuration/checkpoint error or a code error fails the step
once (``allow_retries=False``); a CUDA out-of-memory error or a lost worker may be retried. Shards a
failed worker finished are still recorded as materialized.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import ExitStack, contextmanager, suppress
from pathlib import Path
from typing import Any

from dagster import (
    AssetExecutionContext,
    AssetMaterialization,
    ConfigurableResource,
    DagsterExecutionInterruptedError,
    Failure,
    MetadataValue,
    PipesFileMessageReader,
    PipesTempFileContextInjector,
    PipesTempFileMessageReader,
    open_pipes_session,
)
from dagster._core.definitions.metadata.external_metadata import metadata_map_from_external

from pseudolabel.gpu_lease import DEFAULT_LOCK_DIR, NoFreeGpu, hold_gpu
from pseudolabel.models.loading import WORKER_ENV
from pseudolabel.workers.environment import PYTHON_ENV, ensure_worker_python, source_path_entry
from pseudolabel.workers.lifetime import LEASE_FD_ENV, STEP_PID_ENV
from pseudolabel.workers.task import FAILED, MODELS_LOADED, SHARD_DONE, SHARD_STARTED, WorkerTask
from resources.k8s import owner_references, plain_pod_env, step_pod_name, worker_image, worker_pod_spec

WORKER_MODULE = "pseudolabel.workers"
GPUS_ENV = "PSEUDOLABEL_GPUS"  # how many GPUs this host's workers may use (default: nvidia-smi's count)


def visible_gpus(setting: str = "", environ: Mapping[str, str] | None = None) -> list[str]:
    """Device ids local workers are spread over.

    ``setting`` (or ``$PSEUDOLABEL_GPUS``) is a count; without one, ``nvidia-smi -L`` counts the GPUs.
    Ids are taken from the orchestrator's own ``CUDA_VISIBLE_DEVICES`` when set, else 0..N-1.
    """
    environ = os.environ if environ is None else environ
    raw = (setting or environ.get(GPUS_ENV, "")).strip()
    if raw:
        if not raw.isdigit():
            raise ValueError(f"{GPUS_ENV} / gpus must be a whole number of GPUs, got {raw!r}")
        count = int(raw)
    else:
        count = _nvidia_smi_count()
    visible = [d.strip() for d in environ.get("CUDA_VISIBLE_DEVICES", "").split(",") if d.strip()]
    ids = visible if visible else [str(i) for i in range(count)]
    return ids[:count]


def _nvidia_smi_count() -> int:
    smi = shutil.which("nvidia-smi")
    if smi is None:
        return 0
    try:
        listing = subprocess.run([smi, "-L"], capture_output=True, text=True, timeout=30, check=True).stdout
    except (OSError, subprocess.SubprocessError):
        return 0
    return sum(1 for line in listing.splitlines() if line.startswith("GPU "))


class ModelWorkersResource(ConfigurableResource):
    """What a GPU asset needs: run a task in a model worker and record its shards."""

    def run(
        self, context: AssetExecutionContext, task: WorkerTask, env: Mapping[str, str]
    ) -> dict[str, dict[str, MetadataValue]]:
        """Run ``task`` and return each shard's metadata (already attached to its partition's
        materialization when the asset is partitioned). ``env`` adds what the worker needs to reach
        storage (e.g. the S3 endpoint)."""
        raise NotImplementedError


class LocalModelWorkers(ModelWorkersResource):
    """One worker subprocess per step on this host, on a GPU leased for the step."""

    # Worker interpreters, one per worker environment (pyproject extra). "" = the environment's override
    # variable ($PSEUDOLABEL_WORKER_PYTHON for "worker", $PSEUDOLABEL_WORKER_PYTHON_SAM3 for "worker-sam3",
    # see python_env_var), else its managed environment (built on first use, see `pseudolabel workers
    # install --extra ...`). Tasks that need no model stack (stand-ins, annotation files, the detector's
    # stored masks) run on `python`, $PSEUDOLABEL_WORKER_PYTHON, or else this interpreter.
    python: str = ""  # the "worker" environment's
    pythons: dict[str, str] = {}  # other environments', by extra: {"worker-sam3": "/opt/sam3/bin/python"}
    gpus: str = ""  # number of GPUs to spread workers over; "" = $PSEUDOLABEL_GPUS or nvidia-smi
    lease_dir: str = ""  # "" = $PSEUDOLABEL_GPU_LOCK_DIR or /tmp/pseudolabel-gpu-locks
    lease_timeout_s: float = 3600.0  # wait this long for a free GPU before failing the step
    termination_timeout_s: float = 20.0  # after an interrupt, wait this long before killing the worker

    def run(
        self, context: AssetExecutionContext, task: WorkerTask, env: Mapping[str, str]
    ) -> dict[str, dict[str, MetadataValue]]:
        try:
            python = self.interpreter(task, context.log.info)
        except ValueError as exc:  # models that need two worker environments: no retry can help
            raise Failure(description=f"{task.stage}: {exc}", allow_retries=False) from exc
        try:
            devices = visible_gpus(self.gpus)
        except ValueError as exc:  # a bad PSEUDOLABEL_GPUS / gpus: the same on every retry
            raise Failure(description=f"{task.stage}: {exc}", allow_retries=False) from exc
        # The worker ends with this process (pseudolabel.workers.lifetime).
        worker_env = {**env, "PYTHONPATH": source_path_entry(), STEP_PID_ENV: str(os.getpid())}
        with ExitStack() as stack:
            lease_fds: tuple[int, ...] = ()
            if devices:
                lock_dir = Path(self.lease_dir) if self.lease_dir else DEFAULT_LOCK_DIR
                try:
                    lease = stack.enter_context(hold_gpu(len(devices), lock_dir, self.lease_timeout_s))
                except NoFreeGpu as exc:  # waited lease_timeout_s already: retrying only waits again
                    raise Failure(
                        description=f"{task.stage}: {exc}. Lower the `gpu` pool limit to the number of GPUs "
                        "(`pseudolabel gpu-pool`) or raise lease_timeout_s.",
                        allow_retries=False,
                    ) from exc
                worker_env["CUDA_VISIBLE_DEVICES"] = devices[lease.index]
                worker_env[LEASE_FD_ENV] = str(lease.fd)  # the worker holds the lease as long as it runs
                lease_fds = (lease.fd,)
                context.log.info(
                    f"leased GPU {devices[lease.index]} ({lease.index + 1} of {len(devices)}) for this step"
                )
            context.log.info(
                f"starting model worker: {python} -m {WORKER_MODULE} ({task.stage}, {task.shards})"
            )
            returncode, messages = self._launch(context, task, python, worker_env, lease_fds)
        return record_worker_results(context, task, messages, _exit_problem(returncode))

    def interpreter(self, task: WorkerTask, log: Any = print) -> str:
        """The interpreter of the worker environment ``task`` runs in (see the ``python`` fields)."""
        environment = task.environment
        if environment is None:
            if not self.python and not os.environ.get(PYTHON_ENV):
                return sys.executable  # no model stack needed: numpy, pyarrow and dagster-pipes are here
            environment = WORKER_ENV
        configured = self.python if environment == WORKER_ENV else self.pythons.get(environment, "")
        return configured or ensure_worker_python((environment,), log=log)

    def _launch(
        self,
        context: AssetExecutionContext,
        task: WorkerTask,
        python: str,
        env: Mapping[str, str],
        pass_fds: Sequence[int] = (),
    ) -> tuple[int, Sequence[Any]]:
        """Run the worker to the end in this thread (its parent-death signal follows the thread that
        started it); ``pass_fds`` (the GPU lease) stay open in the worker."""
        with open_pipes_session(
            context=context,
            context_injector=PipesTempFileContextInjector(),
            message_reader=WholeLineTempFileMessageReader(),
            extras=task.to_extras(),
        ) as session:
            process = subprocess.Popen(
                [python, "-m", WORKER_MODULE],
                env={**os.environ, **env, **session.get_bootstrap_env_vars()},
                pass_fds=tuple(pass_fds),
            )
            try:
                returncode = process.wait()
            except DagsterExecutionInterruptedError:
                context.log.info("interrupted: stopping the model worker")
                process.send_signal(signal.SIGINT)
                with suppress(subprocess.TimeoutExpired):
                    process.wait(timeout=self.termination_timeout_s)
                raise  # still running after the timeout: killed below
            finally:
                if process.poll() is None:  # whatever ends the step here ends its worker first
                    process.kill()
                    process.wait()
        return returncode, session.get_custom_messages()


def whole_lines(path: str, should_stop: Callable[[], bool], poll_s: float = 0.01) -> Iterator[str]:
    """Tail ``path``, yielding only complete lines (a trailing unterminated one once ``should_stop``)."""
    pending = ""
    with open(path, encoding="utf-8") as stream:
        while True:
            chunk = stream.readline()
            if chunk:
                pending += chunk
                if pending.endswith("\n"):
                    yield pending
                    pending = ""
            elif should_stop():
                if pending.strip():
                    yield pending
                return
            else:
                time.sleep(poll_s)


class _WholeLineFileMessageReader(PipesFileMessageReader):
    def _reader_thread(self, handler: Any, is_resource_complete: Any) -> None:
        try:
            for line in whole_lines(self._path, is_resource_complete.is_set):
                handler.handle_message(json.loads(line))
        except BaseException:
            handler.report_pipes_framework_exception(f"{type(self).__name__} reader thread", sys.exc_info())
            raise


class WholeLineTempFileMessageReader(PipesTempFileMessageReader):
    """Dagster's temp-file message reader, reading whole lines only. The stock one tails the file with
    ``readline`` and parses what it gets: a shard report (metadata with a preview picture, tens of KB)
    is written in several chunks, and a half-written line read in between fails ``json.loads``, which
    ends the reader thread and silently drops every later message, the closing one included (seen once
    in CI as "the model worker stopped without reporting every shard" from a worker that exited 0)."""

    @contextmanager
    def read_messages(self, handler: Any) -> Iterator[Any]:
        with tempfile.TemporaryDirectory() as tempdir:
            reader = _WholeLineFileMessageReader(os.path.join(tempdir, "messages"))
            with reader.read_messages(handler) as params:
                yield params


class K8sModelWorkers(ModelWorkersResource):
    """One GPU pod per step from the worker image (see deploy/), through ``PipesK8sClient``.

    The pod asks for one ``nvidia.com/gpu`` and lands on GPU nodes (placement and requests from the
    ``PSEUDOLABEL_GPU_*`` environment, see :mod:`resources.k8s`); secrets reach it only as
    environment variables from Kubernetes secrets (``env_secrets``), never in its spec. The step's
    own pod only orchestrates: it needs no GPU.
    """

    image: str  # the CUDA worker image of the "worker" environment (deploy/Dockerfile.worker)
    # Images of the other worker environments, by extra; one missing is read from the step's environment,
    # $PSEUDOLABEL_WORKER_IMAGE_SAM3 for "worker-sam3" (deploy/Dockerfile.worker-sam3), see resources.k8s.
    images: dict[str, str] = {}
    namespace: str = ""  # "" = the run's namespace / the kube config's default
    env_secrets: list[str] = []  # Kubernetes secrets exposed to the worker as environment variables
    service_account: str = ""
    pod_wait_timeout_s: float = 86400.0

    def image_for(self, environment: str | None, environ: Mapping[str, str] | None = None) -> str:
        """The image of the worker environment ``environment`` (None: the task needs no model stack)."""
        return worker_image(environment, self.image, self.images, environ)

    def pod_spec(
        self, environ: Mapping[str, str] | None = None, environment: str | None = None
    ) -> dict[str, Any]:
        """The spec (``base_pod_spec``) of a worker pod for ``environment``; ``environ`` defaults to this
        process's."""
        image = self.image_for(environment, environ)
        return worker_pod_spec(
            image, self.env_secrets, self.service_account, environ, active_deadline_s=self.pod_wait_timeout_s
        )

    def pod_meta(
        self, context: AssetExecutionContext, task: WorkerTask, owners: Sequence[dict[str, Any]] = ()
    ) -> dict[str, Any]:
        """Labels and annotations of a worker pod; ``owners``: its ownerReferences (the step's pod)."""
        meta: dict[str, Any] = {
            "labels": {
                "app.kubernetes.io/component": "model-worker",
                "dagster/run-id": context.run_id,
                "pseudolabel/stage": task.stage,
            },
            # A scale-down eviction would throw away the shard in progress and the loaded models.
            "annotations": {"cluster-autoscaler.kubernetes.io/safe-to-evict": "false"},
        }
        if owners:
            meta["ownerReferences"] = list(owners)
        return meta

    def step_pod_owners(self, log: Any, environ: Mapping[str, str] | None = None) -> list[dict[str, Any]]:
        """ownerReferences to the pod this step runs in, so that deleting it deletes the worker pod even
        when this process was killed before it could (empty outside Kubernetes, when the worker pod goes
        to another namespace, or when the step's pod cannot be read)."""
        name = step_pod_name(environ)
        if name is None:
            return []
        try:
            import kubernetes
            from dagster_k8s.client import DagsterKubernetesClient
            from dagster_k8s.utils import detect_current_namespace

            namespace = detect_current_namespace(None)
            if namespace is None or (self.namespace and self.namespace != namespace):
                return []  # an owner must live in its dependents' namespace
            kubernetes.config.load_incluster_config()
            pod = DagsterKubernetesClient.production_client().core_api.read_namespaced_pod(name, namespace)
            return owner_references(pod.metadata.name, pod.metadata.uid)
        except Exception as exc:  # noqa: BLE001 - the pod is still deleted when the step ends or fails
            log.warning(f"the model-worker pod will not be owned by this step's pod {name}: {_short(exc)}")
            return []

    def run(
        self, context: AssetExecutionContext, task: WorkerTask, env: Mapping[str, str]
    ) -> dict[str, dict[str, MetadataValue]]:
        plain_env, dropped = plain_pod_env(env)
        if dropped:
            context.log.warning(
                f"not passing {', '.join(dropped)} to the worker pod: credentials come only from its "
                f"Kubernetes secrets ({', '.join(self.env_secrets) or 'none configured'})"
            )
        try:
            environment = task.environment
            image = self.image_for(environment)
        except ValueError as exc:  # no image for the environment, or models that need two environments
            raise Failure(
                description=f"{task.stage}: {exc}. Retrying will not help: fix the configuration and re-run.",
                allow_retries=False,
            ) from exc
        # bad GPU_* settings fail here
        pod_spec = self.pod_spec(environment=environment)
        pod_meta = self.pod_meta(context, task, self.step_pod_owners(context.log))
        from dagster_k8s import PipesK8sClient  # only a k8s deployment pays for the kubernetes client

        reader = _recording_pod_logs_reader()
        where = f"model-worker pod for step {context.op.name} (image {image}"
        where += f", namespace {self.namespace})" if self.namespace else ")"
        context.log.info(f"starting {where}: {task.stage}, {task.shards}")
        try:
            invocation = PipesK8sClient(message_reader=reader).run(
                context=context,
                extras=task.to_extras(),
                namespace=self.namespace or None,
                env=plain_env,
                base_pod_meta=pod_meta,
                base_pod_spec=pod_spec,
                pod_wait_timeout=self.pod_wait_timeout_s,
            )
        except DagsterExecutionInterruptedError:
            raise  # PipesK8sClient deletes the pod on the way out
        except Exception as exc:
            context.log.error(f"{where} failed: {type(exc).__name__}: {exc}")
            if not _worth_retrying(exc):
                raise Failure(
                    description=f"{task.stage}: could not run the {where}: {_short(exc)}. "
                    "Retrying will not help: fix the cluster access or the pod spec and re-run.",
                    allow_retries=False,
                ) from exc
            problem = f"the {where} failed: {_short(exc)}"
            return record_worker_results(context, task, reader.custom_messages(), problem)
        return record_worker_results(context, task, invocation.get_custom_messages(), None)


def _recording_pod_logs_reader() -> Any:
    """A pod-logs message reader that keeps its message handler, so the worker's reports survive a
    failed pod (``PipesK8sClient`` hands back its session only on success)."""
    from dagster_k8s import PipesK8sPodLogsMessageReader

    class RecordingPodLogsReader(PipesK8sPodLogsMessageReader):
        handler: Any = None

        @contextmanager
        def read_messages(self, handler: Any) -> Iterator[Any]:
            self.handler = handler
            with super().read_messages(handler) as params:
                yield params

        def custom_messages(self) -> Sequence[Any]:
            return self.handler.get_custom_messages() if self.handler is not None else ()

    return RecordingPodLogsReader()


def _worth_retrying(exc: BaseException) -> bool:
    """False when the pod could not be created for a reason a retry does not change (no cluster
    access, forbidden, an invalid spec); True for a failed, evicted or timed-out pod."""
    from dagster._core.errors import DagsterInvariantViolationError
    from kubernetes.client.exceptions import ApiException
    from kubernetes.config.config_exception import ConfigException

    if isinstance(exc, ConfigException | DagsterInvariantViolationError):
        return False
    if isinstance(exc, ApiException):
        return exc.status not in (400, 401, 403, 422)
    return True


def _short(exc: BaseException, limit: int = 1500) -> str:
    text = f"{type(exc).__name__}: {exc}"
    return text if len(text) <= limit else text[:limit] + " [...] (full error in the step's logs)"


def _exit_problem(returncode: int) -> str | None:
    if returncode == 0:
        return None
    if returncode < 0:
        name = signal.Signals(-returncode).name
        return f"the model worker was killed by signal {-returncode} ({name})"
    return f"the model worker exited with code {returncode}"


def record_worker_results(
    context: AssetExecutionContext, task: WorkerTask, messages: Sequence[Any], problem: str | None
) -> dict[str, dict[str, MetadataValue]]:
    """Turn the worker's reports into one materialization per shard, or a clear failure.

    On success each shard's metadata goes onto its own partition's materialization. On failure the
    shards the worker finished are recorded right away, and the step fails with what happened and
    where; it is retryable only when a retry can succeed (out of memory, a lost worker).
    """
    events = [m for m in messages if isinstance(m, dict)]
    done = {
        m["shard"]: metadata_map_from_external(m["metadata"]) for m in events if m.get("event") == SHARD_DONE
    }
    loads = sum(1 for m in events if m.get("event") == MODELS_LOADED)
    partitioned = context.assets_def.partitions_def is not None
    failed = next((m for m in events if m.get("event") == FAILED), None)
    missing = [shard for shard in task.shards if shard not in done]
    if failed is None and not missing:
        if problem is not None:  # e.g. a crash in interpreter teardown: every shard is written and reported
            context.log.warning(f"{problem} after it reported every shard; their results are kept")
        for shard, metadata in done.items():
            metadata["model_loads_in_step"] = MetadataValue.int(loads)
            if partitioned:
                context.add_asset_metadata(metadata, partition_key=shard)
        return done

    for shard, metadata in done.items() if partitioned else ():
        context.log_event(
            AssetMaterialization(asset_key=context.asset_key, partition=shard, metadata=metadata)
        )
    started = [m["shard"] for m in events if m.get("event") == SHARD_STARTED]
    current = (
        failed.get("shard") if failed else (started[-1] if started and started[-1] not in done else None)
    )
    where = f"while processing {current}" if current else "before it started a shard (loading the models)"
    if failed is not None:
        what = f"{failed['message']}"
        retry = failed.get("kind") == "oom"
    else:
        what = problem or "the model worker stopped without reporting every shard"
        retry = True  # a lost worker (killed, evicted, OOM-killed by the kernel) may succeed next time
    recorded = f"; finished shards recorded: {', '.join(done)}" if done else ""
    raise Failure(
        description=f"{task.stage} failed {where}: {what}{recorded}. "
        + ("A retry may succeed." if retry else "Retrying will not help: fix the cause and re-run."),
        metadata={"failed_shard": current or "", "finished_shards": list(done), "unfinished_shards": missing},
        allow_retries=retry,
    )
