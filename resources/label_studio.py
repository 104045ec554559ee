"""The Label Studio project the review queue fills and the corrections sensor reads.

``PSEUDOLABEL_LABEL_STUDIO_URL`` and ``PSEUDOLABEL_LABEL_STUDIO_TOKEN`` (a personal access token from the
user's Account & Settings page, or a legacy token) are read through ``EnvVar`` when a step runs, so the UI
shows the variable names, never the token. Images reach Label Studio in one of two ways, by the storage
in use: from S3 as presigned URLs, or from a local store through Label Studio's own "Local files" serving
(start Label Studio with ``LABEL_STUDIO_LOCAL_FILES_SERVING_ENABLED=true`` and
``LABEL_STUDIO_LOCAL_FILES_DOCUMENT_ROOT`` set to a folder that contains the storage root, and give that
folder here as ``local_files_document_root``).
"""

# No ``from __future__ import annotations``: Dagster reads resource field annotations at runtime.
import os
from pathlib import Path

from dagster import ConfigurableResource, EnvVar
from pydantic import Field

from pseudolabel.review.label_studio import LabelStudioClient, local_file_url
from pseudolabel.storage import LocalObjectStore, ObjectStore, S3ObjectStore

URL_ENV = "PSEUDOLABEL_LABEL_STUDIO_URL"
TOKEN_ENV = "PSEUDOLABEL_LABEL_STUDIO_TOKEN"
DOCUMENT_ROOT_ENV = "PSEUDOLABEL_LABEL_STUDIO_DOCUMENT_ROOT"


class LabelStudioNotConfigured(ValueError):
    """No Label Studio URL or token: say which variables to set."""


class LabelStudioResource(ConfigurableResource):
    """Where review tasks go and corrections come from."""

    url: str = Field(
        default="", description=f"Label Studio base URL, e.g. http://127.0.0.1:8080 (${URL_ENV})."
    )
    token: str = Field(
        default="",
        description=f"Personal access token or legacy token (${TOKEN_ENV}); shown in the UI by name only.",
    )
    project_title: str = Field(
        default="pseudolabel review", description="The project review tasks go to; created on first use."
    )
    local_files_document_root: str = Field(
        default="",
        description=(
            "Local storage only: the folder Label Studio serves local files from "
            f"(its LABEL_STUDIO_LOCAL_FILES_DOCUMENT_ROOT, ${DOCUMENT_ROOT_ENV}); must contain the storage root."
        ),
    )
    presigned_url_expiry_s: int = Field(
        default=7 * 24 * 3600, description="S3 storage only: how long an image URL in a task stays valid."
    )

    def client(self) -> LabelStudioClient:
        if not self.url.strip() or not self.token.strip():
            raise LabelStudioNotConfigured(
                f"Label Studio is not configured: set {URL_ENV} (e.g. http://127.0.0.1:8080) and {TOKEN_ENV} "
                "(Account & Settings -> Personal Access Token) where the code location runs"
            )
        return LabelStudioClient(self.url.rstrip("/"), self.token)

    def image_url(self, store: ObjectStore, key: str) -> str:
        """How Label Studio (the reviewer's browser) reaches the stored image ``key``."""
        if isinstance(store, S3ObjectStore):
            return store.presigned_url(key, self.presigned_url_expiry_s)
        if isinstance(store, LocalObjectStore):
            return local_file_url(self._relative(Path(store.uri(key))).as_posix())
        raise ValueError(f"cannot give Label Studio access to images in {store.uri()}")

    def local_storage_path(self, store: ObjectStore, prefix: str) -> str | None:
        """The folder a "Local files" storage of the project must point at (None for S3)."""
        if not isinstance(store, LocalObjectStore):
            return None
        path = Path(store.uri(prefix)).resolve()
        self._relative(path)  # checks it lies under the document root
        return str(path)

    def _relative(self, path: Path) -> Path:
        root = self.local_files_document_root.strip()
        if not root:
            raise LabelStudioNotConfigured(
                f"a local image store needs {DOCUMENT_ROOT_ENV}: the folder Label Studio serves local files "
                "from (its LABEL_STUDIO_LOCAL_FILES_DOCUMENT_ROOT), containing the storage root"
            )
        try:
            return path.resolve().relative_to(Path(root).expanduser().resolve())
        except ValueError:
            raise LabelStudioNotConfigured(
                f"{path} is not under the Label Studio document root {root}: set "
                f"LABEL_STUDIO_LOCAL_FILES_DOCUMENT_ROOT and {DOCUMENT_ROOT_ENV} to a folder containing it"
            ) from None


def label_studio_from_env() -> LabelStudioResource:
    """The resource the environment describes; an unconfigured one still loads (the review assets then
    fail with a message saying what to set)."""

    def env(name: str) -> str | EnvVar:
        return EnvVar(name) if os.environ.get(name, "").strip() else ""

    return LabelStudioResource(
        url=env(URL_ENV), token=env(TOKEN_ENV), local_files_document_root=env(DOCUMENT_ROOT_ENV)
    )
