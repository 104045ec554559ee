"""A Label Studio REST client for the review queue: projects, a local-files storage, task import without
duplicates, and reading the reviewers' annotations back with a cursor.

Plain httpx rather than label-studio-sdk, because the SDK pins opencv-python-headless < 4.13 and hence
numpy < 2.3, which would downgrade the orchestrator's environment.

Authentication takes either kind of Label Studio token: a personal access token (a JWT refresh token:
exchanged at ``/api/token/refresh/`` for a short-lived access token, sent as ``Bearer``, refreshed again
when the server answers 401) or a legacy token (sent as ``Token``; Label Studio 1.23 refuses it unless the
organization enabled legacy tokens). Requests are retried only where a retry can succeed: connection
failures and 429/502/503/504 for idempotent requests; for POST only failures that prove the request was
not processed (no connection, 429, 503), so an import is never sent twice. Everything else raises
:class:`LabelStudioError` with the status, the path and Label Studio's own message.
"""

from __future__ import annotations

import base64
import binascii
import json
import os
import posixpath
import time
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import Any
from urllib.parse import quote

import httpx
from tenacity import Retrying, retry_if_exception_type, stop_after_attempt

from pseudolabel.retry import RetryableError, parse_retry_after, retry_wait

IMPORT_CHUNK = 500  # tasks per POST /import: one request stays well under Django's and proxies' limits
KEYS_PAGE_SIZE = 1000  # tasks per page when only their data is read
FULL_PAGE_SIZE = 100  # tasks per page with annotations and predictions (brush RLEs are large)
MAX_BACKOFF_S = 30.0
MAX_RETRY_AFTER_S = 120.0
IMPORT_POLL_S = 0.5
# Tasks are pre-filtered on the server by the task's updated_at, which Label Studio bumps right after
# saving an annotation; the margin keeps a task whose bump came first, and the exact test is made on
# each annotation's own updated_at here.
TASK_CLOCK_MARGIN = timedelta(seconds=60)
LOCAL_FILES_PATH = "/data/local-files/"

_IDEMPOTENT = frozenset({"GET", "HEAD", "OPTIONS", "PUT", "PATCH", "DELETE"})  # our PATCHes set fields
_RETRY_STATUSES = frozenset({429, 502, 503, 504})
_UNPROCESSED_STATUSES = frozenset({429, 503})  # safe to resend a POST after these
_UNSENT_ERRORS = (httpx.ConnectError, httpx.ConnectTimeout, httpx.PoolTimeout)
_DM_TIME_FORMAT = "%Y-%m-%dT%H:%M:%S.%fZ"  # the Data Manager's Datetime filter format (UTC)


class LabelStudioError(Exception):
    """A request Label Studio refused or could not answer: ``status`` (None without an answer), the
    request's ``method`` and ``path``, and Label Studio's own ``message``."""

    def __init__(self, status: int | None, method: str, path: str, message: str):
        shown = f"HTTP {status}" if status is not None else "no answer"
        super().__init__(f"Label Studio {method} {path} failed ({shown}): {message}")
        self.status, self.method, self.path, self.message = status, method, path, message


class _RetryableStatus(RetryableError):
    """An answer worth asking again (429/5xx); carries the response for the final error."""

    def __init__(self, response: httpx.Response):
        super().__init__(
            f"HTTP {response.status_code}", parse_retry_after(response.headers.get("Retry-After"))
        )
        self.response = response


@dataclass(frozen=True)
class ImportResult:
    """Tasks created by :meth:`LabelStudioClient.import_tasks`, and tasks skipped as already present
    (or repeated in the input)."""

    created: int
    skipped: int


@dataclass(frozen=True)
class ReviewedTasks:
    """Tasks with an annotation updated after the cursor, oldest change first, and the new cursor: the
    newest annotation ``updated_at`` seen (the old cursor when nothing is new)."""

    tasks: list[dict[str, Any]]
    cursor: str | None


def is_personal_access_token(token: str) -> bool:
    """True for a JWT (three base64url parts, the first a JSON header naming its ``alg``): Label Studio's
    personal access tokens are JWT refresh tokens, its legacy tokens are 40 hex digits."""
    parts = token.split(".")
    if len(parts) != 3 or not all(parts):
        return False
    try:
        header = json.loads(base64.urlsafe_b64decode(parts[0] + "=" * (-len(parts[0]) % 4)))
    except (ValueError, binascii.Error):  # bad base64, bad UTF-8 or bad JSON
        return False
    return isinstance(header, dict) and "alg" in header


def local_file_url(relative_path: str) -> str:
    """The URL Label Studio serves a file at, given its path relative to the server's
    ``LOCAL_FILES_DOCUMENT_ROOT`` (not to the storage's folder): what a task's image field holds."""
    path = posixpath.normpath(relative_path.replace(os.sep, "/")).lstrip("/")
    if path == "." or path.startswith("../"):
        raise ValueError(f"{relative_path!r} is not a file path below the document root")
    return f"{LOCAL_FILES_PATH}?d={quote(path, safe='/')}"


def parse_time(value: str) -> datetime:
    """An ISO 8601 timestamp as an aware datetime (a naive one is taken as UTC, Label Studio's zone)."""
    parsed = datetime.fromisoformat(value)
    return parsed if parsed.tzinfo is not None else parsed.replace(tzinfo=UTC)


def task_key(task: Mapping[str, Any], key: str) -> str:
    """The task's unique id ``data[key]``; a task without one (or with a non-string one) is a caller bug."""
    value = (task.get("data") or {}).get(key)
    if not isinstance(value, str) or not value:
        raise ValueError(f"task has no string data[{key!r}]: {json.dumps(task)[:200]}")
    return value


def reviewed_task(task: Mapping[str, Any], emails: Mapping[int, str]) -> dict[str, Any]:
    """One task of the review export: its id, data, annotations (oldest change first) and predictions,
    plus ``last_annotation_updated_at``; ``completed_by`` is ``{"id", "email"}`` (email None if unknown)."""
    annotations = sorted(
        (_annotation(raw, emails) for raw in task.get("annotations") or []),
        key=lambda a: parse_time(a["updated_at"]),
    )
    return {
        "id": task["id"],
        "data": task.get("data") or {},
        "annotations": annotations,
        "predictions": [_prediction(raw) for raw in task.get("predictions") or []],
        "last_annotation_updated_at": annotations[-1]["updated_at"] if annotations else None,
    }


def _annotation(raw: Mapping[str, Any], emails: Mapping[int, str]) -> dict[str, Any]:
    user = raw.get("completed_by")
    if isinstance(user, Mapping):  # some endpoints expand the user
        completed_by = {"id": user.get("id"), "email": user.get("email")}
    else:
        completed_by = {"id": user, "email": emails.get(user) if isinstance(user, int) else None}
    return {
        "id": raw["id"],
        "result": raw.get("result") or [],
        "completed_by": completed_by,
        "created_at": raw.get("created_at"),
        "updated_at": raw.get("updated_at") or raw.get("created_at"),
        "was_cancelled": bool(raw.get("was_cancelled")),
        "ground_truth": bool(raw.get("ground_truth")),
        "lead_time": raw.get("lead_time"),
        "parent_prediction": raw.get("parent_prediction"),
    }


def _prediction(raw: Mapping[str, Any]) -> dict[str, Any]:
    fields = ("id", "model_version", "score", "result", "created_at", "updated_at")
    return {name: raw.get(name) for name in fields}


def _reviewed_query(counter: str, after: datetime | None) -> dict[str, Any]:
    """A Data Manager filter: tasks whose ``counter`` is positive (and, with a cursor, updated lately)."""
    items: list[dict[str, Any]] = [
        {"filter": f"filter:tasks:{counter}", "operator": "greater", "type": "Number", "value": 0}
    ]
    if after is not None:
        since = (after - TASK_CLOCK_MARGIN).astimezone(UTC).strftime(_DM_TIME_FORMAT)
        items.append(
            {"filter": "filter:tasks:updated_at", "operator": "greater", "type": "Datetime", "value": since}
        )
    return {"filters": {"conjunction": "and", "items": items}}


def _message(response: httpx.Response) -> str:
    """Label Studio's own explanation: ``detail`` (+ ``validation_errors``) of its JSON errors, else the
    start of the body; 401/403 say that the token was refused."""
    try:
        body = response.json()
    except ValueError:
        text = response.text.strip()[:500] or response.reason_phrase
    else:
        if isinstance(body, dict):
            parts = [str(body[k]) for k in ("detail", "message", "error") if body.get(k)]
            if body.get("validation_errors"):
                parts.append(json.dumps(body["validation_errors"]))
            text = "; ".join(parts) or json.dumps(body)[:500]
        else:
            text = json.dumps(body)[:500]
    if response.status_code in (401, 403):
        return f"authentication failed, the token was refused: {text}"
    if response.is_redirect:
        return f"unexpected redirect to {response.headers.get('Location')}"
    return text


class LabelStudioClient:
    """A synchronous client of one Label Studio server (``url``: its root, e.g. ``http://host:8080``)."""

    def __init__(
        self,
        url: str,
        token: str,
        timeout_s: float = 30,
        *,
        attempts: int = 5,
        backoff_s: float = 1.0,
        import_timeout_s: float = 600.0,
        transport: httpx.BaseTransport | None = None,
    ):
        if not token:
            raise ValueError("a Label Studio token is required")
        self.url = url.rstrip("/")
        self._token = token
        self._personal = is_personal_access_token(token)
        self._access: str | None = None
        self._attempts = attempts
        self._backoff_s = backoff_s
        self._import_timeout_s = import_timeout_s
        self._http = httpx.Client(
            base_url=self.url,
            timeout=httpx.Timeout(timeout_s),
            headers={"Accept": "application/json", "User-Agent": "pseudolabel-review/1"},
            transport=transport,
        )

    def close(self) -> None:
        self._http.close()

    def __enter__(self) -> LabelStudioClient:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # -- projects and storage -------------------------------------------------------------------------

    def ensure_project(self, title: str, label_config: str, description: str = "") -> int:
        """The id of the project titled exactly ``title`` (the oldest if several), created if missing; its
        label config is replaced (PATCH) when it differs from ``label_config``. ``description`` is set on
        creation only."""
        matches = [p for p in self._projects_titled(title) if p.get("title") == title]
        if not matches:
            body = {"title": title, "label_config": label_config, "description": description}
            return int(self.request_json("POST", "/api/projects/", json=body)["id"])
        project = min(matches, key=lambda p: int(p["id"]))
        if (project.get("label_config") or "").strip() != label_config.strip():
            self.request_json("PATCH", f"/api/projects/{project['id']}/", json={"label_config": label_config})
        return int(project["id"])

    def get_project(self, project_id: int) -> dict[str, Any]:
        return self.request_json("GET", f"/api/projects/{project_id}/")

    def ensure_local_storage(self, project_id: int, path: str, title: str) -> int:
        """The id of the project's "Local files" import storage on ``path`` (an absolute folder below the
        server's ``LOCAL_FILES_DOCUMENT_ROOT``), created if missing. Never synced: tasks are imported by
        :meth:`import_tasks`; the storage only lets Label Studio serve the files (:func:`local_file_url`)."""
        wanted = os.path.normpath(path)
        storages = self.request_json("GET", "/api/storages/localfiles/", params={"project": project_id})
        for storage in storages:
            if os.path.normpath(storage.get("path") or "") == wanted:
                return int(storage["id"])
        body = {"project": project_id, "path": wanted, "title": title, "use_blob_urls": True}
        return int(self.request_json("POST", "/api/storages/localfiles/", json=body)["id"])

    # -- tasks ----------------------------------------------------------------------------------------

    def existing_keys(self, project_id: int, key: str) -> set[str]:
        """``data[key]`` of every task of the project (tasks without it are ignored)."""
        return {
            str(task["data"][key])
            for task in self._iter_tasks(project_id, full=False, page_size=KEYS_PAGE_SIZE)
            if key in (task.get("data") or {})
        }

    def list_tasks(self, project_id: int) -> list[dict[str, Any]]:
        """Every task of the project as Label Studio gives it, annotations and predictions included."""
        return list(self._iter_tasks(project_id, full=True, page_size=FULL_PAGE_SIZE))

    def import_tasks(
        self,
        project_id: int,
        tasks: Sequence[Mapping[str, Any]],
        key: str = "review_key",
        chunk: int = IMPORT_CHUNK,
    ) -> ImportResult:
        """Import the tasks (``{"data": {..., key: id}, "predictions": [...]}``) whose ``data[key]`` the
        project does not hold yet, ``chunk`` per request; the others (and repeats in ``tasks``) are skipped."""
        seen = self.existing_keys(project_id, key)
        fresh: list[Mapping[str, Any]] = []
        for task in tasks:
            value = task_key(task, key)
            if value not in seen:
                seen.add(value)
                fresh.append(task)
        created = sum(
            self._import_chunk(project_id, fresh[start : start + chunk])
            for start in range(0, len(fresh), chunk)
        )
        return ImportResult(created=created, skipped=len(tasks) - len(fresh))

    # -- annotations ----------------------------------------------------------------------------------

    def reviewed_tasks(self, project_id: int, updated_after: str | None = None) -> ReviewedTasks:
        """Tasks with at least one submitted (or skipped: ``was_cancelled``) annotation updated after
        ``updated_after`` (ISO 8601; None: all), each with all its annotations and its predictions
        (:func:`reviewed_task`), sorted by their newest annotation change; drafts are not included."""
        after = parse_time(updated_after) if updated_after else None
        found: dict[int, dict[str, Any]] = {}
        for counter in ("total_annotations", "cancelled_annotations"):  # one filter cannot say (a or b) and c
            query = _reviewed_query(counter, after)
            for task in self._iter_tasks(project_id, full=True, page_size=FULL_PAGE_SIZE, query=query):
                found[task["id"]] = task
        emails = self._user_emails() if found else {}
        tasks = [reviewed_task(task, emails) for task in found.values()]
        tasks = [
            t
            for t in tasks
            if t["last_annotation_updated_at"] is not None
            and (after is None or parse_time(t["last_annotation_updated_at"]) > after)
        ]
        tasks.sort(key=lambda t: (parse_time(t["last_annotation_updated_at"]), t["id"]))
        cursor = tasks[-1]["last_annotation_updated_at"] if tasks else updated_after
        return ReviewedTasks(tasks=tasks, cursor=cursor)

    def create_annotation(
        self,
        task_id: int,
        result: list[dict[str, Any]],
        *,
        was_cancelled: bool = False,
        ground_truth: bool = False,
        lead_time: float | None = None,
        parent_prediction: int | None = None,
    ) -> dict[str, Any]:
        """Submit an annotation on the task as the token's user (what a reviewer's "Submit" does)."""
        body: dict[str, Any] = {
            "result": result,
            "was_cancelled": was_cancelled,
            "ground_truth": ground_truth,
        }
        if lead_time is not None:
            body["lead_time"] = lead_time
        if parent_prediction is not None:
            body["parent_prediction"] = parent_prediction
        return self.request_json("POST", f"/api/tasks/{task_id}/annotations/", json=body)

    def update_annotation(self, annotation_id: int, result: list[dict[str, Any]]) -> dict[str, Any]:
        """Replace an annotation's result (what a reviewer's "Update" does); bumps its ``updated_at``."""
        return self.request_json("PATCH", f"/api/annotations/{annotation_id}/", json={"result": result})

    # -- raw access -----------------------------------------------------------------------------------

    def request_json(
        self,
        method: str,
        path: str,
        *,
        params: Mapping[str, Any] | None = None,
        json: Any = None,
    ) -> Any:
        """Any API call, authenticated and retried like the others; the decoded JSON answer (None if empty)."""
        response = self._request(method, path, params=params, json=json)
        return response.json() if response.content else None

    def get_bytes(self, path: str) -> bytes:
        """The body of a server-relative URL, e.g. a :func:`local_file_url`, fetched with the token."""
        return self._request("GET", path).content

    # -- internals ------------------------------------------------------------------------------------

    def _projects_titled(self, title: str) -> list[dict[str, Any]]:
        """Projects whose title contains ``title`` (Label Studio's filter is case-insensitive "contains")."""
        found: list[dict[str, Any]] = []
        page = 1
        while True:
            params = {"title": title, "page": page, "page_size": 100}
            body = self.request_json("GET", "/api/projects/", params=params)
            if isinstance(body, list):  # an unpaginated answer
                return found + body
            found += body.get("results") or []
            if not body.get("next"):
                return found
            page += 1

    def _iter_tasks(
        self, project_id: int, *, full: bool, page_size: int, query: Mapping[str, Any] | None = None
    ) -> Iterator[dict[str, Any]]:
        """Tasks page by page (in id order), data as stored (``resolve_uri=false``); ``full`` adds
        annotations and predictions; ``query`` is a Data Manager filter."""
        params: dict[str, Any] = {"project": project_id, "page_size": page_size, "resolve_uri": "false"}
        if full:
            params["fields"] = "all"
        if query is not None:
            params["query"] = json.dumps(query)
        page, seen = 1, 0
        while True:
            body = self.request_json("GET", "/api/tasks/", params={**params, "page": page})
            tasks = body.get("tasks") or []
            yield from tasks
            seen += len(tasks)
            if not tasks or seen >= int(body.get("total") or 0):
                return
            page += 1

    def _import_chunk(self, project_id: int, tasks: Sequence[Mapping[str, Any]]) -> int:
        """Tasks created by one import request; the Enterprise edition imports in the background, so an
        answer naming an import job is waited for."""
        path = f"/api/projects/{project_id}/import"
        body = self.request_json("POST", path, json=list(tasks))
        if isinstance(body, dict) and "task_count" in body:
            return int(body["task_count"])
        if isinstance(body, dict) and "import" in body:
            return self._wait_for_import(project_id, int(body["import"]))
        raise LabelStudioError(201, "POST", path, f"unexpected answer {json.dumps(body)[:300]}")

    def _wait_for_import(self, project_id: int, import_id: int) -> int:
        path = f"/api/projects/{project_id}/imports/{import_id}/"
        deadline = time.monotonic() + self._import_timeout_s
        while True:
            job = self.request_json("GET", path)
            if job.get("status") == "completed":
                return int(job.get("task_count") or 0)
            if job.get("status") == "failed":
                raise LabelStudioError(200, "GET", path, f"import failed: {job.get('error')}")
            if time.monotonic() > deadline:
                raise LabelStudioError(
                    200, "GET", path, f"import still {job.get('status')!r} after the timeout"
                )
            time.sleep(IMPORT_POLL_S)

    def _user_emails(self) -> dict[int, str]:
        """User id -> email for the organization's users ({} when the token may not list them)."""
        try:
            body = self.request_json("GET", "/api/users/")
        except LabelStudioError as exc:
            if exc.status in (403, 404):
                return {}
            raise
        users = body.get("results", []) if isinstance(body, dict) else body
        return {int(u["id"]): u["email"] for u in users if u.get("email")}

    def _request(
        self, method: str, path: str, *, params: Mapping[str, Any] | None = None, json: Any = None
    ) -> httpx.Response:
        """A 2xx answer, or :class:`LabelStudioError`; a personal access token is refreshed once on 401."""
        response = self._send(method, path, params=params, json=json, authenticated=True)
        if response.status_code == 401 and self._personal:
            self._refresh_access()
            response = self._send(method, path, params=params, json=json, authenticated=True)
        if not response.is_success:
            raise LabelStudioError(response.status_code, method, path, _message(response))
        return response

    def _refresh_access(self) -> None:
        path = "/api/token/refresh/"
        response = self._send("POST", path, params=None, json={"refresh": self._token}, authenticated=False)
        if not response.is_success:
            message = _message(response)
            if response.status_code in (400, 401):
                message = f"the personal access token was refused: {message}"
            raise LabelStudioError(response.status_code, "POST", path, message)
        self._access = response.json()["access"]

    def _authorization(self) -> str:
        if not self._personal:
            return f"Token {self._token}"
        if self._access is None:
            self._refresh_access()
        return f"Bearer {self._access}"

    def _send(
        self, method: str, path: str, *, params: Mapping[str, Any] | None, json: Any, authenticated: bool
    ) -> httpx.Response:
        """One request, retried while that can help (see the module docstring); the last answer is returned
        whatever its status, a lasting transport failure raises :class:`LabelStudioError`."""
        idempotent = method.upper() in _IDEMPOTENT
        statuses = _RETRY_STATUSES if idempotent else _UNPROCESSED_STATUSES
        errors = httpx.TransportError if idempotent else _UNSENT_ERRORS
        retrying = Retrying(
            stop=stop_after_attempt(self._attempts),
            wait=retry_wait(
                backoff_initial_s=self._backoff_s,
                backoff_max_s=MAX_BACKOFF_S,
                retry_after_max_s=MAX_RETRY_AFTER_S,
            ),
            retry=retry_if_exception_type((errors, _RetryableStatus)),
            reraise=True,
        )
        try:
            for attempt in retrying:
                with attempt:
                    headers = {"Authorization": self._authorization()} if authenticated else {}
                    response = self._http.request(method, path, params=params, json=json, headers=headers)
                    if response.status_code in statuses:
                        raise _RetryableStatus(response)
                    return response
        except _RetryableStatus as exc:
            return exc.response
        except httpx.TransportError as exc:
            raise LabelStudioError(None, method, path, f"{type(exc).__name__}: {exc}") from exc
        raise AssertionError("unreachable: tenacity re-raises the last failure")
