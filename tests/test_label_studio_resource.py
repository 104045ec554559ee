"""How review tasks point Label Studio at the images: local-files URLs or S3 presigned URLs, and the errors a
user sees when Label Studio is not set up for the storage in use."""

from __future__ import annotations

import httpx
import pytest

from pseudolabel import layout
from resources.label_studio import LabelStudioNotConfigured, LabelStudioResource


@pytest.mark.parametrize("backend", ["s3"])
def test_an_s3_store_gives_presigned_urls_that_work_without_credentials(store):
    key = layout.image("shard-00000", "abc")
    store.put_bytes(key, b"jpeg bytes")
    url = LabelStudioResource(presigned_url_expiry_s=600).image_url(store, key)
    assert "Signature=" in url or "X-Amz-Signature=" in url
    response = httpx.get(url)  # no credentials: what a reviewer's browser does
    assert response.status_code == 200 and response.content == b"jpeg bytes"
    assert LabelStudioResource().local_storage_path(store, "images/") is None


def test_a_local_store_gives_local_files_urls_under_the_document_root(tmp_path):
    from pseudolabel.storage import LocalObjectStore

    store = LocalObjectStore(tmp_path / "root" / "my store")
    key = layout.image("shard-00000", "abc")
    resource = LabelStudioResource(local_files_document_root=str(tmp_path / "root"))
    assert resource.image_url(store, key) == "/data/local-files/?d=my%20store/images/shard-00000/abc.jpg"
    assert resource.local_storage_path(store, "images/") == str(tmp_path / "root" / "my store" / "images")

    with pytest.raises(LabelStudioNotConfigured, match="PSEUDOLABEL_LABEL_STUDIO_DOCUMENT_ROOT"):
        LabelStudioResource().image_url(store, key)
    with pytest.raises(LabelStudioNotConfigured, match="is not under the Label Studio document root"):
        LabelStudioResource(local_files_document_root=str(tmp_path / "elsewhere")).image_url(store, key)


def test_an_unconfigured_label_studio_says_what_to_set():
    with pytest.raises(
        LabelStudioNotConfigured, match="PSEUDOLABEL_LABEL_STUDIO_URL.*PSEUDOLABEL_LABEL_STUDIO_TOKEN"
    ):
        LabelStudioResource().client()
