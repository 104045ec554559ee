"""`dagster dev` (webserver + daemon + code server) as a subprocess on 127.0.0.1, driven through the
GraphQL API exactly as the UI drives it: the same mutations and queries, no Python API shortcuts."""

from __future__ import annotations

import contextlib
import json
import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any, TypeVar

import requests
import yaml

REPO = Path(__file__).resolve().parents[1]
LOCATION = "pseudolabel"  # workspace.yaml's location_name
REPOSITORY = "__repository__"  # a Definitions object's repository name
ASSET_JOB = "__ASSET_JOB"  # what the UI's "Materialize" button launches an asset selection as
DONE_RUN = {"SUCCESS", "FAILURE", "CANCELED"}
DONE_BACKFILL = {"COMPLETED", "COMPLETED_SUCCESS", "COMPLETED_FAILED", "FAILED", "CANCELED"}

T = TypeVar("T")

# Dagster's backfill daemon looks at backfills every 30 s (`DEFAULT_DAEMON_INTERVAL_SECONDS`, not an
# instance setting), so each backfill would wait up to 30 s to be submitted and as long again to be
# marked complete. Tests shorten that pass in the `dagster-daemon` process only, through a
# sitecustomize on its PYTHONPATH; the daemon's logic is untouched. None keeps Dagster's cadence.
BACKFILL_DAEMON_INTERVAL_S: int | None = 2
_DAEMON_CADENCE = """\
# Written by tests/dagster_dev.py: shorten the backfill daemon's pass in `python -m dagster._daemon run`.
import os
import sys

if sys.orig_argv[1:4] == ["-m", "dagster._daemon", "run"]:
    import dagster._daemon.controller

    dagster._daemon.controller.DEFAULT_DAEMON_INTERVAL_SECONDS = {interval}

# Run a sitecustomize this one shadows (e.g. Debian's), if any.
_here = os.path.dirname(os.path.abspath(__file__))
for _entry in sys.path:
    _other = os.path.join(_entry, "sitecustomize.py")
    if os.path.abspath(_entry or ".") != _here and os.path.isfile(_other):
        with open(_other) as _file:
            exec(compile(_file.read(), _other, "exec"), {{"__name__": "sitecustomize", "__file__": _other}})
        break
"""


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def instance_yaml(home: Path, extra: Mapping[str, Any] | None = None) -> Path:
    """``$DAGSTER_HOME/dagster.yaml``: the repo's instance settings (pools, run monitoring, run queue)
    plus ``extra`` (e.g. a ``storage:`` block), with a short run-queue poll so tests wait less."""
    settings = yaml.safe_load((REPO / "dagster.yaml").read_text())
    settings["run_queue"] = {"dequeue_interval_seconds": 1}
    settings.update(extra or {})
    home.mkdir(parents=True, exist_ok=True)
    path = home / "dagster.yaml"
    path.write_text(yaml.safe_dump(settings, sort_keys=False))
    return path


class DagsterDev:
    """``dagster dev -w workspace.yaml`` from the repo root, in its own process group."""

    def __init__(self, home: Path, env: Mapping[str, str], log_path: Path):
        self.home, self.env, self.log_path = home, dict(env), log_path
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.process: subprocess.Popen | None = None
        self.http = requests.Session()

    # -- lifecycle ---------------------------------------------------------------------------

    def start(self, timeout_s: float = 180) -> DagsterDev:
        dagster = str(Path(sys.executable).parent / "dagster")
        env = {**self.env, "DAGSTER_HOME": str(self.home)}
        if BACKFILL_DAEMON_INTERVAL_S is not None:
            site = self.home / "sitecustomize"
            site.mkdir(exist_ok=True)
            (site / "sitecustomize.py").write_text(
                _DAEMON_CADENCE.format(interval=BACKFILL_DAEMON_INTERVAL_S)
            )
            env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(site), env.get("PYTHONPATH", "")]))
        with open(self.log_path, "ab") as log:
            self.process = subprocess.Popen(
                [dagster, "dev", "-w", "workspace.yaml", "-h", "127.0.0.1", "-p", str(self.port)],
                cwd=REPO,
                env=env,
                stdout=log,
                stderr=subprocess.STDOUT,
                stdin=subprocess.DEVNULL,
                start_new_session=True,  # its own process group: stop() ends webserver, daemon, runs
            )
        self.wait_for("the webserver to answer /server_info", self._server_info, timeout_s)
        self.wait_for("the code location to load", self.location_loaded, timeout_s)
        return self

    def stop(self) -> None:
        if self.process is None:
            return
        if self.process.poll() is None:
            for sig, wait_s in ((signal.SIGTERM, 30), (signal.SIGKILL, 10)):
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(self.process.pid, sig)
                try:
                    self.process.wait(wait_s)
                    break
                except subprocess.TimeoutExpired:
                    continue
        # Code server, run workers and their step processes share the group: no stragglers.
        with contextlib.suppress(ProcessLookupError):
            os.killpg(self.process.pid, signal.SIGKILL)

    def __enter__(self) -> DagsterDev:
        try:
            return self.start()
        except BaseException:
            self.stop()
            raise

    def __exit__(self, exc_type: object, *exc: object) -> None:
        self.stop()
        if exc_type is not None:  # pytest shows a failed test's stdout: the server's side of the story
            print(f"----- dagster dev output (tail, {self.log_path}) -----\n{self.tail()}")

    # -- diagnostics -------------------------------------------------------------------------

    def tail(self, chars: int = 8000) -> str:
        try:
            text = self.log_path.read_text(errors="replace")
        except OSError:
            return "<no dagster dev output>"
        return text[-chars:]

    def fail(self, message: str) -> AssertionError:
        return AssertionError(f"{message}\n----- dagster dev output (tail) -----\n{self.tail()}")

    def wait_for(
        self, what: str, probe: Callable[[], T | None], timeout_s: float, interval_s: float = 0.5
    ) -> T:
        """Poll ``probe`` until it returns something truthy; fail with the server's output otherwise."""
        deadline = time.monotonic() + timeout_s
        while True:
            if self.process is not None and self.process.poll() is not None:
                raise self.fail(f"dagster dev exited ({self.process.returncode}) while waiting for {what}")
            value = probe()
            if value:
                return value
            if time.monotonic() > deadline:
                raise self.fail(f"timed out after {timeout_s:.0f}s waiting for {what}")
            time.sleep(interval_s)

    def _server_info(self) -> bool:
        try:
            return self.http.get(f"{self.url}/server_info", timeout=5).ok
        except requests.RequestException:
            return False

    # -- GraphQL -----------------------------------------------------------------------------

    def graphql(self, query: str, **variables: Any) -> dict[str, Any]:
        try:
            response = self.http.post(
                f"{self.url}/graphql", json={"query": query, "variables": variables}, timeout=60
            )
        except requests.RequestException as exc:
            raise self.fail(f"GraphQL request failed: {exc}") from exc
        if not response.ok:
            raise self.fail(f"GraphQL HTTP {response.status_code}: {response.text[:3000]}")
        body = response.json()
        if body.get("errors"):
            raise self.fail(f"GraphQL errors: {json.dumps(body['errors'])[:3000]}\nquery: {query}")
        return body["data"]

    def expect(self, result: Mapping[str, Any], typename: str, what: str) -> Mapping[str, Any]:
        """A union result of the expected type, or a failure carrying the error Dagster returned."""
        if result.get("__typename") != typename:
            raise self.fail(f"{what}: expected {typename}, got {json.dumps(result)[:3000]}")
        return result

    def location_loaded(self) -> bool:
        data = self.graphql(
            """
            query Workspace {
              workspaceOrError {
                __typename
                ... on Workspace {
                  locationEntries {
                    name
                    loadStatus
                    locationOrLoadError { __typename ... on PythonError { message } }
                  }
                }
              }
            }
            """
        )["workspaceOrError"]
        entries = {entry["name"]: entry for entry in data.get("locationEntries", [])}
        entry = entries.get(LOCATION)
        if entry is None or entry["loadStatus"] != "LOADED":
            return False
        if entry["locationOrLoadError"]["__typename"] != "RepositoryLocation":
            raise self.fail(f"code location failed to load: {entry['locationOrLoadError']}")
        return True

    def reload_location(self) -> None:
        """The UI's "Reload" button on the code location."""
        result = self.graphql(
            """
            mutation Reload($location: String!) {
              reloadRepositoryLocation(repositoryLocationName: $location) {
                __typename
                ... on WorkspaceLocationEntry { loadStatus }
                ... on Error { message }
              }
            }
            """,
            location=LOCATION,
        )["reloadRepositoryLocation"]
        self.expect(result, "WorkspaceLocationEntry", "reloadRepositoryLocation")
        self.wait_for("the reloaded code location", self.location_loaded, 120)

    def set_pool_limit(self, pool: str, limit: int) -> None:
        """Deployment → Concurrency → pool limit (what `pseudolabel gpu-pool` sets from the CLI)."""
        result = self.graphql(
            """
            mutation SetPool($pool: String!, $limit: Int!) {
              setConcurrencyLimit(concurrencyKey: $pool, limit: $limit)
            }
            """,
            pool=pool,
            limit=limit,
        )
        if result["setConcurrencyLimit"] is not True:
            raise self.fail(f"setConcurrencyLimit({pool}, {limit}) returned {result}")

    def pool_limit(self, pool: str) -> int:
        data = self.graphql(
            """
            query Pool($pool: String!) {
              instance { concurrencyLimit(concurrencyKey: $pool) { slotCount } }
            }
            """,
            pool=pool,
        )
        return data["instance"]["concurrencyLimit"]["slotCount"]

    # -- runs --------------------------------------------------------------------------------

    def materialize(self, assets: Sequence[str], run_config: Mapping[str, Any] | None = None) -> str:
        """The asset graph's "Materialize" (launchpad) for an unpartitioned selection; returns the run id."""
        result = self.graphql(
            """
            mutation Launch($params: ExecutionParams!) {
              launchPipelineExecution(executionParams: $params) {
                __typename
                ... on LaunchRunSuccess { run { runId } }
                ... on RunConfigValidationInvalid { errors { message } }
                ... on Error { message }
              }
            }
            """,
            params={
                "selector": {
                    "repositoryLocationName": LOCATION,
                    "repositoryName": REPOSITORY,
                    "pipelineName": ASSET_JOB,
                    "assetSelection": [{"path": [name]} for name in assets],
                },
                "runConfigData": dict(run_config or {}),
                "mode": "default",
                "executionMetadata": {"tags": []},
            },
        )["launchPipelineExecution"]
        return self.expect(result, "LaunchRunSuccess", "launchPipelineExecution")["run"]["runId"]

    def run(self, run_id: str) -> dict[str, Any]:
        result = self.graphql(
            """
            query Run($runId: ID!) {
              runOrError(runId: $runId) {
                __typename
                ... on Run { runId status jobName tags { key value } }
                ... on Error { message }
              }
            }
            """,
            runId=run_id,
        )["runOrError"]
        return dict(self.expect(result, "Run", f"runOrError({run_id})"))

    def wait_run(self, run_id: str, timeout_s: float) -> dict[str, Any]:
        run = self.wait_for(
            f"run {run_id} to finish",
            lambda: (lambda r: r if r["status"] in DONE_RUN else None)(self.run(run_id)),
            timeout_s,
        )
        if run["status"] != "SUCCESS":
            raise self.fail(f"run {run_id} ended {run['status']}:\n{self.failure_messages(run_id)}")
        return run

    def runs(self, tags: Mapping[str, str]) -> list[dict[str, Any]]:
        result = self.graphql(
            """
            query Runs($filter: RunsFilter!) {
              runsOrError(filter: $filter) {
                __typename
                ... on Runs { results { runId status jobName tags { key value } } }
                ... on Error { message }
              }
            }
            """,
            filter={"tags": [{"key": k, "value": v} for k, v in tags.items()]},
        )["runsOrError"]
        return list(self.expect(result, "Runs", "runsOrError")["results"])

    def events(self, run_id: str) -> list[dict[str, Any]]:
        """Every event of a run (the run page's log view), paged with the log cursor."""
        query = """
            query Logs($runId: ID!, $cursor: String) {
              logsForRun(runId: $runId, afterCursor: $cursor, limit: 1000) {
                __typename
                ... on EventConnection {
                  cursor
                  hasMore
                  events {
                    __typename
                    ... on MessageEvent { message timestamp stepKey eventType level }
                    ... on MaterializationEvent {
                      assetKey { path }
                      partition
                      metadataEntries {
                        label
                        ... on JsonMetadataEntry { jsonString }
                        ... on TextMetadataEntry { text }
                      }
                    }
                  }
                }
                ... on Error { message }
              }
            }
        """
        events: list[dict[str, Any]] = []
        cursor = None
        while True:
            page = self.graphql(query, runId=run_id, cursor=cursor)["logsForRun"]
            page = self.expect(page, "EventConnection", f"logsForRun({run_id})")
            events.extend(page["events"])
            cursor = page["cursor"]
            if not page["hasMore"]:
                return events

    def failure_messages(self, run_id: str) -> str:
        lines = [
            f"{e.get('stepKey')}: {e.get('eventType')}: {e.get('message')}"
            for e in self.events(run_id)
            if e.get("level") in {"ERROR", "CRITICAL"}
            or e.get("eventType") in {"STEP_FAILURE", "RUN_FAILURE"}
        ]
        return "\n".join(lines)[-6000:]

    # -- backfills ---------------------------------------------------------------------------

    def backfill_job(self, job: str, run_config: Mapping[str, Any] | None = None) -> str:
        """A job's partitions page → "Materialize all partitions" (a job backfill); returns its id."""
        result = self.graphql(
            """
            mutation Backfill($params: LaunchBackfillParams!) {
              launchPartitionBackfill(backfillParams: $params) {
                __typename
                ... on LaunchBackfillSuccess { backfillId }
                ... on Error { message }
              }
            }
            """,
            params={
                "selector": {
                    "partitionSetName": f"{job}_partition_set",
                    "repositorySelector": {
                        "repositoryLocationName": LOCATION,
                        "repositoryName": REPOSITORY,
                    },
                },
                "allPartitions": True,
                "runConfigData": dict(run_config or {}),
                "tags": [],
            },
        )["launchPartitionBackfill"]
        return self.expect(result, "LaunchBackfillSuccess", "launchPartitionBackfill")["backfillId"]

    def backfill(self, backfill_id: str) -> dict[str, Any]:
        result = self.graphql(
            """
            query Backfill($id: String!) {
              partitionBackfillOrError(backfillId: $id) {
                __typename
                ... on PartitionBackfill {
                  id
                  status
                  partitionNames
                  error { message }
                }
                ... on Error { message }
              }
            }
            """,
            id=backfill_id,
        )["partitionBackfillOrError"]
        return dict(self.expect(result, "PartitionBackfill", f"partitionBackfillOrError({backfill_id})"))

    def backfill_runs(self, backfill_id: str) -> list[dict[str, Any]]:
        return self.runs({"dagster/backfill": backfill_id})

    def wait_backfill_runs(self, backfill_id: str, expected_runs: int, timeout_s: float) -> list[dict]:
        """Until the daemon has launched ``expected_runs`` runs for the backfill and all finished."""

        def finished() -> list[dict] | None:
            runs = self.backfill_runs(backfill_id)
            failed = [r for r in runs if r["status"] in {"FAILURE", "CANCELED"}]
            if failed:
                run_id = failed[0]["runId"]
                raise self.fail(
                    f"backfill run {run_id} ended {failed[0]['status']}:\n{self.failure_messages(run_id)}"
                )
            if len(runs) >= expected_runs and all(r["status"] == "SUCCESS" for r in runs):
                return runs
            return None

        return self.wait_for(f"the runs of backfill {backfill_id}", finished, timeout_s, interval_s=1)

    def wait_backfill(self, backfill_id: str, timeout_s: float) -> dict[str, Any]:
        backfill = self.wait_for(
            f"backfill {backfill_id} to complete",
            lambda: (lambda b: b if b["status"] in DONE_BACKFILL else None)(self.backfill(backfill_id)),
            timeout_s,
            interval_s=1,
        )
        if backfill["status"] not in {"COMPLETED", "COMPLETED_SUCCESS"}:
            raise self.fail(f"backfill {backfill_id} ended {backfill['status']}: {backfill.get('error')}")
        return backfill

    # -- assets ------------------------------------------------------------------------------

    def asset_partitions(self, asset: str) -> list[str]:
        return list(self._asset_node(asset, "partitionKeys")["partitionKeys"])

    def stale_status(self, asset: str, partitions: Sequence[str]) -> dict[str, tuple[str, set[str]]]:
        """Per partition: the UI's sync badge (FRESH / STALE / MISSING) and its causes' categories."""
        node = self.graphql(
            """
            query Stale($key: AssetKeyInput!, $partitions: [String!]) {
              assetNodeOrError(assetKey: $key) {
                __typename
                ... on AssetNode {
                  staleStatusByPartition(partitions: $partitions)
                  staleCausesByPartition(partitions: $partitions) { category reason }
                }
                ... on Error { message }
              }
            }
            """,
            key={"path": [asset]},
            partitions=list(partitions),
        )["assetNodeOrError"]
        node = self.expect(node, "AssetNode", f"assetNodeOrError({asset})")
        return {
            partition: (status, {cause["category"] for cause in causes or []})
            for partition, status, causes in zip(
                partitions, node["staleStatusByPartition"], node["staleCausesByPartition"], strict=True
            )
        }

    def _asset_node(self, asset: str, fields: str) -> Mapping[str, Any]:
        node = self.graphql(
            f"""
            query Node($key: AssetKeyInput!) {{
              assetNodeOrError(assetKey: $key) {{
                __typename
                ... on AssetNode {{ {fields} }}
                ... on Error {{ message }}
              }}
            }}
            """,
            key={"path": [asset]},
        )["assetNodeOrError"]
        return self.expect(node, "AssetNode", f"assetNodeOrError({asset})")


def event_time(event: Mapping[str, Any]) -> float:
    """GraphQL event timestamps are epoch milliseconds, as strings."""
    return int(event["timestamp"]) / 1000.0


def metadata_json(event: Mapping[str, Any], label: str) -> Any:
    for entry in event.get("metadataEntries", []):
        if entry["label"] == label and "jsonString" in entry:
            return json.loads(entry["jsonString"])
    return None
