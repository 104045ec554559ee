"""A real Label Studio for tests: its own virtualenv, a server on 127.0.0.1, and tokens the client takes.

    python = ensure_label_studio_python()
    with start_label_studio(python, tmp / "data", tmp / "files") as server:
        client = server.client()          # personal access token; server.legacy_token works too

Label Studio's pins clash with Dagster's, so it lives in a virtualenv of its own, built and cached like
the model-worker environments (:func:`pseudolabel.workers.environment.ensure_worker_python`: keyed by the
requirement set, built once under a file lock, kept between runs; ``$PSEUDOLABEL_WORKER_PYTHON_LABEL_STUDIO``
names a prebuilt one). The server runs offline (no Sentry, no analytics, no version check) on SQLite in
``data_dir``, serves local files below ``document_root``, and gets its user non-interactively. Label Studio
1.23 refuses legacy tokens by default, so :func:`start_label_studio` logs in once, creates a personal
access token, and then enables legacy tokens through the organization's JWT settings API, so tests can
use either kind.
"""

from __future__ import annotations

import json
import os
import re
import secrets
import signal
import socket
import subprocess
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import httpx

from pseudolabel.review.label_studio import LabelStudioClient
from pseudolabel.workers.environment import ensure_worker_python

LABEL_STUDIO_REQUIREMENTS = (
    "label-studio==1.23.2",
    "sentry-sdk<3",  # sentry-sdk 3.0 makes label-studio 1.23.2 crash at start ("send_default_pii")
)
LABEL_STUDIO_EXTRA = "label-studio"  # names the environment: $PSEUDOLABEL_WORKER_PYTHON_LABEL_STUDIO
USERNAME = "reviewer@pseudolabel.test"  # Label Studio users are e-mail addresses
CREDENTIALS_FILE = "pseudolabel-credentials.json"
START_TIMEOUT_S = 180.0
STOP_TIMEOUT_S = 15.0
_KEPT_ENV = ("PATH", "HOME", "LANG", "LC_ALL", "TMPDIR", "TZ", "SSL_CERT_FILE", "SSL_CERT_DIR")
_PORT_MOVED = re.compile(r"Port \d+ is in use")


def ensure_label_studio_python(log: Callable[[str], object] = print) -> str:
    """The interpreter of a virtualenv with Label Studio 1.23.2, built on first use (about a minute)."""
    return ensure_worker_python(extras=(LABEL_STUDIO_EXTRA,), requirements=LABEL_STUDIO_REQUIREMENTS, log=log)


@dataclass
class LabelStudioServer:
    """A running Label Studio: ``url``, a personal access ``token`` and a ``legacy_token`` for the user
    ``username``; files below ``document_root`` can be served through a local-files storage."""

    url: str
    token: str
    legacy_token: str
    username: str
    password: str
    document_root: Path
    data_dir: Path
    python: str
    log_path: Path
    process: subprocess.Popen[bytes] = field(repr=False)

    def client(self, token: str | None = None) -> LabelStudioClient:
        """A client of this server with ``token`` (default: the personal access token)."""
        return LabelStudioClient(self.url, token or self.token)

    def stop(self) -> None:
        """Terminate the server's process group (SIGKILL after ``STOP_TIMEOUT_S``)."""
        _stop_group(self.process)

    def __enter__(self) -> LabelStudioServer:
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()


def start_label_studio(
    python: str,
    data_dir: Path,
    document_root: Path,
    port: int | None = None,
    timeout_s: float = START_TIMEOUT_S,
) -> LabelStudioServer:
    """Start ``label-studio start`` on 127.0.0.1 (a free port unless ``port``), wait until ``/health``
    answers, and obtain its tokens; on failure the server is stopped and the error carries its log's tail.

    ``data_dir`` holds the SQLite database, the media and the credentials (a restart on the same
    ``data_dir`` reuses them); ``document_root`` is the server's ``LOCAL_FILES_DOCUMENT_ROOT``.
    """
    data_dir, document_root = Path(data_dir).resolve(), Path(document_root).resolve()
    data_dir.mkdir(parents=True, exist_ok=True)
    document_root.mkdir(parents=True, exist_ok=True)
    credentials = _credentials(data_dir)
    port = port or _free_port()
    url = f"http://127.0.0.1:{port}"
    log_path = data_dir / "server.log"
    log_start = log_path.stat().st_size if log_path.exists() else 0  # a restart appends to the log
    command = [
        python,
        "-m",
        "label_studio.server",
        "start",
        "--no-browser",
        "--internal-host",
        "127.0.0.1",
        "--port",
        str(port),
        f"--data-dir={data_dir}",
        f"--database={data_dir / 'label_studio.sqlite3'}",
        f"--username={USERNAME}",
        f"--password={credentials['password']}",  # "=": a value starting with "-" is no option
        f"--user-token={credentials['legacy_token']}",
    ]
    with open(log_path, "ab") as log:
        process = subprocess.Popen(
            command,
            stdin=subprocess.DEVNULL,
            stdout=log,
            stderr=subprocess.STDOUT,
            env=server_environment(data_dir, document_root, credentials["secret_key"]),
            cwd=data_dir,
            start_new_session=True,  # its own process group: stop() ends the server and its children
        )
    try:
        _wait_healthy(url, process, log_path, log_start, timeout_s)
        token = credentials.get("token") or _create_personal_token(url, credentials["password"])
        credentials["token"] = token
        (data_dir / CREDENTIALS_FILE).write_text(json.dumps(credentials, indent=2) + "\n")
        with LabelStudioClient(url, token) as client:
            client.request_json("POST", "/api/jwt/settings", json={"legacy_api_tokens_enabled": True})
    except BaseException as exc:
        _stop_group(process)
        if not isinstance(exc, Exception):  # KeyboardInterrupt and the like: as they are
            raise
        tail = _tail(log_path, since=log_start)
        raise RuntimeError(
            f"Label Studio did not start at {url}: {exc}\n--- {log_path} (tail) ---\n{tail}"
        ) from exc
    return LabelStudioServer(
        url=url,
        token=token,
        legacy_token=credentials["legacy_token"],
        username=USERNAME,
        password=credentials["password"],
        document_root=document_root,
        data_dir=data_dir,
        python=python,
        log_path=log_path,
        process=process,
    )


def server_environment(data_dir: Path, document_root: Path, secret_key: str) -> dict[str, str]:
    """The server's environment: only the basics of ours (Label Studio reads many generic names such as
    ``HOST``, ``PORT``, ``DEBUG`` or ``USERNAME``), offline settings and local-files serving."""
    env = {name: os.environ[name] for name in _KEPT_ENV if name in os.environ}
    env.update(
        {
            "LABEL_STUDIO_BASE_DATA_DIR": str(data_dir),  # also read before the arguments are
            "LABEL_STUDIO_LOCAL_FILES_SERVING_ENABLED": "true",
            "LABEL_STUDIO_LOCAL_FILES_DOCUMENT_ROOT": str(document_root),
            "SENTRY_DSN": "",  # empty: sentry_sdk is never initialised (the default reports to Heartex)
            "FRONTEND_SENTRY_DSN": "",
            "COLLECT_ANALYTICS": "false",
            "LATEST_VERSION_CHECK": "false",  # no PyPI request at start
            "SECRET_KEY": secret_key,  # fixed per data_dir: tokens signed with it survive a restart
            "LOG_LEVEL": "WARNING",
            "PYTHONUNBUFFERED": "1",
        }
    )
    return env


def _credentials(data_dir: Path) -> dict[str, str]:
    """The user's password, the legacy token and Django's secret key: made once per ``data_dir``."""
    path = data_dir / CREDENTIALS_FILE
    if path.exists():
        return json.loads(path.read_text())
    credentials = {
        "password": secrets.token_urlsafe(16),
        "legacy_token": secrets.token_hex(20),  # the shape of Label Studio's own legacy tokens
        "secret_key": secrets.token_urlsafe(50),
    }
    path.write_text(json.dumps(credentials, indent=2) + "\n")
    path.chmod(0o600)
    return credentials


def _wait_healthy(
    url: str, process: subprocess.Popen[bytes], log_path: Path, log_start: int, timeout_s: float
) -> None:
    deadline = time.monotonic() + timeout_s
    while True:
        if process.poll() is not None:
            raise RuntimeError(f"the server exited with status {process.returncode}")
        try:
            if httpx.get(f"{url}/health", timeout=2).status_code == 200:
                break
        except httpx.TransportError:
            pass
        if time.monotonic() > deadline:
            raise TimeoutError(f"no answer from {url}/health after {timeout_s:.0f}s")
        time.sleep(0.5)
    if _PORT_MOVED.search(_log_text(log_path, since=log_start)):  # Label Studio moves on to the next port
        raise RuntimeError(f"port {url.rsplit(':', 1)[1]} was taken and Label Studio moved elsewhere")


def _create_personal_token(url: str, password: str) -> str:
    """Log in as the user (Django's login form, with its CSRF cookie) and create a personal access token
    (``POST /api/token/``): the only way to a token that Label Studio 1.23 accepts by default."""
    with httpx.Client(base_url=url, timeout=30) as http:
        http.get("/user/login/").raise_for_status()
        csrf = http.cookies["csrftoken"]
        form = {"email": USERNAME, "password": password, "csrfmiddlewaretoken": csrf}
        login = http.post("/user/login/", data=form, headers={"Referer": f"{url}/user/login/"})
        if login.status_code != 302 or "/user/login" in login.headers.get("Location", ""):
            raise RuntimeError(f"login as {USERNAME} failed (HTTP {login.status_code}): {login.text[:300]}")
        headers = {"X-CSRFToken": http.cookies["csrftoken"], "Referer": f"{url}/"}
        created = http.post("/api/token/", json={}, headers=headers)
        if created.status_code != 201:
            raise RuntimeError(f"POST /api/token/ failed (HTTP {created.status_code}): {created.text[:300]}")
        return created.json()["token"]


def _stop_group(process: subprocess.Popen[bytes]) -> None:
    if process.poll() is not None:
        return
    try:
        os.killpg(process.pid, signal.SIGTERM)
        process.wait(STOP_TIMEOUT_S)
    except subprocess.TimeoutExpired:
        os.killpg(process.pid, signal.SIGKILL)
        process.wait()
    except ProcessLookupError:
        process.wait()


def _log_text(path: Path, since: int = 0) -> str:
    """What the server wrote to its log from byte ``since`` on."""
    try:
        with open(path, "rb") as log:
            log.seek(since)
            return log.read().decode(errors="replace")
    except OSError as exc:
        return f"(no log: {exc})"


def _tail(path: Path, since: int = 0, lines: int = 60) -> str:
    return "\n".join(_log_text(path, since).splitlines()[-lines:])


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]
