"""The Label Studio client: against a real Label Studio 1.23.2 (the session's ``label_studio`` fixture),
plus its token, retry and import-job handling against scripted answers (httpx.MockTransport)."""

from __future__ import annotations

import base64
import io
import json
import sys
import uuid
from collections.abc import Callable, Iterator
from typing import Any

import httpx
import numpy as np
import pytest
from PIL import Image

from pseudolabel.review.label_studio import (
    LabelStudioClient,
    LabelStudioError,
    is_personal_access_token,
    local_file_url,
    parse_time,
)
from pseudolabel.testing.label_studio import LabelStudioServer, start_label_studio

CONFIG = (
    '<View><Image name="image" value="$image"/><BrushLabels name="label" toName="image">'
    '<Label value="cat"/></BrushLabels></View>'
)
CONFIG_WITH_DOG = CONFIG.replace('<Label value="cat"/>', '<Label value="cat"/><Label value="dog"/>')
W, H = 12, 8


def brush(region_id: str, rle: list[int], label: str = "cat") -> dict[str, Any]:
    """A brush region as a prediction or annotation result item."""
    return {
        "type": "brushlabels",
        "from_name": "label",
        "to_name": "image",
        "original_width": W,
        "original_height": H,
        "image_rotation": 0,
        "value": {"format": "rle", "rle": rle, "brushlabels": [label]},
        "id": region_id,
    }


def review_task(key: str, image: str = "/data/local-files/?d=x.png") -> dict[str, Any]:
    rle = [ord(c) for c in key]  # differs per task, so a mix-up between tasks shows
    prediction = {"model_version": "gdino+sam2", "score": 0.75, "result": [brush("c0", rle)]}
    return {"data": {"image": image, "review_key": key}, "predictions": [prediction]}


@pytest.fixture
def client(label_studio: LabelStudioServer) -> Iterator[LabelStudioClient]:
    with label_studio.client() as client:
        yield client


@pytest.fixture
def project(client: LabelStudioClient) -> int:
    return client.ensure_project(f"review {uuid.uuid4().hex[:8]}", CONFIG)


# -- against the real server ---------------------------------------------------------------------------


def test_ensure_project_finds_the_exact_title_and_updates_the_config(client: LabelStudioClient):
    title = f"pseudolabel review {uuid.uuid4().hex[:8]}"
    longer = client.ensure_project(f"{title} (old)", CONFIG)  # "contains" the title, must not match

    first = client.ensure_project(title, CONFIG, description="masks to check")
    assert first != longer
    assert client.ensure_project(title, CONFIG) == first
    assert client.get_project(first)["description"] == "masks to check"

    assert client.ensure_project(title, CONFIG_WITH_DOG) == first
    assert client.get_project(first)["label_config"] == CONFIG_WITH_DOG
    assert client.get_project(longer)["label_config"] == CONFIG


def test_local_storage_is_idempotent_and_serves_files(
    label_studio: LabelStudioServer, client: LabelStudioClient, project: int
):
    folder = label_studio.document_root / f"images-{uuid.uuid4().hex[:8]}"
    (folder / "shard 0").mkdir(parents=True)
    image = folder / "shard 0" / "a#1.png"
    buffer = io.BytesIO()
    Image.fromarray(np.random.default_rng(0).integers(0, 255, (H, W, 3), dtype=np.uint8)).save(buffer, "PNG")
    image.write_bytes(buffer.getvalue())

    storage = client.ensure_local_storage(project, str(folder), title="pseudolabel images")
    assert client.ensure_local_storage(project, f"{folder}/", title="again") == storage
    listed = client.request_json("GET", "/api/storages/localfiles/", params={"project": project})
    assert [s["id"] for s in listed] == [storage]

    url = local_file_url(str(image.relative_to(label_studio.document_root)))
    assert client.get_bytes(url) == image.read_bytes()

    outside = label_studio.document_root / f"elsewhere-{uuid.uuid4().hex[:8]}" / "b.png"
    outside.parent.mkdir()
    outside.write_bytes(buffer.getvalue())
    with pytest.raises(LabelStudioError) as refused:  # no storage covers it: not served
        client.get_bytes(local_file_url(str(outside.relative_to(label_studio.document_root))))
    assert refused.value.status in (403, 404)


def test_import_tasks_never_duplicates_and_keeps_predictions(client: LabelStudioClient, project: int):
    first = client.import_tasks(project, [review_task(f"k{i}") for i in range(5)])
    assert (first.created, first.skipped) == (5, 0)

    overlapping = [review_task(f"k{i}") for i in range(3, 8)] + [review_task("k7")]  # k7 twice in the input
    second = client.import_tasks(project, overlapping, chunk=2)  # 3 new tasks over 2 requests
    assert (second.created, second.skipped) == (3, 3)
    assert client.import_tasks(project, overlapping).created == 0

    tasks = client.list_tasks(project)
    assert sorted(t["data"]["review_key"] for t in tasks) == [f"k{i}" for i in range(8)]
    assert client.existing_keys(project, "review_key") == {f"k{i}" for i in range(8)}
    for task in tasks:
        [prediction] = task["predictions"]
        assert prediction["result"] == review_task(task["data"]["review_key"])["predictions"][0]["result"]
        assert (prediction["model_version"], prediction["score"]) == ("gdino+sam2", 0.75)


def test_import_tasks_needs_the_key(client: LabelStudioClient, project: int):
    with pytest.raises(ValueError, match="review_key"):
        client.import_tasks(project, [{"data": {"image": "/x.png"}}])
    assert client.list_tasks(project) == []


def test_reviewed_tasks_follow_the_cursor(
    label_studio: LabelStudioServer, client: LabelStudioClient, project: int
):
    client.import_tasks(project, [review_task(f"r{i}") for i in range(3)])
    by_key = {t["data"]["review_key"]: t for t in client.list_tasks(project)}
    nothing = client.reviewed_tasks(project, None)
    assert (nothing.tasks, nothing.cursor) == ([], None)

    # A reviewer accepts r0's prediction as is: the annotation copies its result, region ids included.
    r0 = by_key["r0"]
    prediction = r0["predictions"][0]
    created = client.create_annotation(r0["id"], prediction["result"], parent_prediction=prediction["id"])
    first = client.reviewed_tasks(project, None)
    [task] = first.tasks
    [annotation] = task["annotations"]
    assert (task["id"], task["data"]["review_key"]) == (r0["id"], "r0")
    assert annotation["id"] == created["id"]
    assert annotation["result"] == prediction["result"]
    assert [region["id"] for region in annotation["result"]] == ["c0"]  # Label Studio keeps the region id
    assert annotation["parent_prediction"] == prediction["id"]
    assert annotation["completed_by"]["email"] == label_studio.username
    assert isinstance(annotation["completed_by"]["id"], int)
    assert (annotation["was_cancelled"], annotation["ground_truth"]) == (False, False)
    assert task["predictions"][0]["result"] == prediction["result"]
    assert first.cursor == annotation["updated_at"] == task["last_annotation_updated_at"]

    unchanged = client.reviewed_tasks(project, first.cursor)
    assert (unchanged.tasks, unchanged.cursor) == ([], first.cursor)

    # Then r1 is skipped and r0's annotation edited: both come back, oldest change first.
    client.create_annotation(by_key["r1"]["id"], [], was_cancelled=True)
    edited = client.update_annotation(created["id"], [brush("c0", [1, 2, 3], "cat")])
    later = client.reviewed_tasks(project, first.cursor)
    assert [t["data"]["review_key"] for t in later.tasks] == ["r1", "r0"]
    assert later.tasks[0]["annotations"][0]["was_cancelled"] is True
    assert later.tasks[1]["annotations"][0]["result"][0]["value"]["rle"] == [1, 2, 3]
    assert later.cursor == edited["updated_at"]
    assert parse_time(later.cursor) > parse_time(first.cursor)
    assert client.reviewed_tasks(project, later.cursor).tasks == []
    assert len(client.reviewed_tasks(project, None).tasks) == 2  # r2 was never reviewed


def test_both_token_kinds_work_and_a_bad_token_says_so(label_studio: LabelStudioServer):
    assert is_personal_access_token(label_studio.token)
    assert not is_personal_access_token(label_studio.legacy_token)
    title = f"legacy {uuid.uuid4().hex[:8]}"
    with label_studio.client(label_studio.legacy_token) as legacy, label_studio.client() as personal:
        assert legacy.ensure_project(title, CONFIG) == personal.ensure_project(title, CONFIG)

    header, payload, signature = label_studio.token.split(".")
    forged = f"{header}.{payload}.{signature[::-1]}"
    for bad, path in ((forged, "/api/token/refresh/"), ("0" * 40, "/api/projects/")):
        with label_studio.client(bad) as client, pytest.raises(LabelStudioError) as refused:
            client.ensure_project(title, CONFIG)
        assert (refused.value.status, refused.value.path) == (401, path)
        assert "token was refused" in str(refused.value)


# -- scripted answers: tokens, retries, background imports ----------------------------------------------

Handler = Callable[[httpx.Request], httpx.Response]


def scripted(handler: Handler, token: str = "legacy-token") -> tuple[LabelStudioClient, list[httpx.Request]]:
    seen: list[httpx.Request] = []

    def record(request: httpx.Request) -> httpx.Response:
        seen.append(request)
        return handler(request)

    client = LabelStudioClient(
        "http://ls.test", token, attempts=3, backoff_s=0, transport=httpx.MockTransport(record)
    )
    return client, seen


def jwt(claims: dict[str, Any]) -> str:
    def part(obj: dict[str, Any]) -> str:
        return base64.urlsafe_b64encode(json.dumps(obj).encode()).decode().rstrip("=")

    return f"{part({'alg': 'HS256', 'typ': 'JWT'})}.{part(claims)}.c2lnbmF0dXJl"


def test_personal_token_is_refreshed_when_the_access_token_expires():
    refresh = jwt({"token_type": "refresh"})
    issued: list[str] = []

    def handler(request: httpx.Request) -> httpx.Response:
        if request.url.path == "/api/token/refresh/":
            assert json.loads(request.content) == {"refresh": refresh}
            issued.append(f"access-{len(issued)}")
            return httpx.Response(200, json={"access": issued[-1]})
        if request.headers["Authorization"] != "Bearer access-1":  # the first access token "expired"
            return httpx.Response(401, json={"detail": "Given token not valid for any token type"})
        return httpx.Response(200, json={"ok": True})

    client, seen = scripted(handler, token=refresh)
    assert client.request_json("GET", "/api/version/") == {"ok": True}
    assert client.request_json("GET", "/api/version/") == {"ok": True}  # no refresh needed this time
    assert issued == ["access-0", "access-1"]
    assert [r.url.path for r in seen].count("/api/token/refresh/") == 2


def test_legacy_token_is_sent_as_is():
    client, seen = scripted(lambda request: httpx.Response(200, json=[]), token="abc123")
    client.request_json("GET", "/api/projects/")
    assert seen[0].headers["Authorization"] == "Token abc123"


def test_gets_are_retried_on_503_and_posts_not_on_502():
    answers = iter([httpx.Response(503, headers={"Retry-After": "0"}), httpx.Response(504)])

    def handler(request: httpx.Request) -> httpx.Response:
        if request.method == "POST":
            return httpx.Response(502, text="<html>Bad Gateway</html>")
        return next(answers, httpx.Response(200, json={"id": 1}))

    client, seen = scripted(handler)
    assert client.request_json("GET", "/api/projects/1/") == {"id": 1}
    assert len(seen) == 3

    with pytest.raises(LabelStudioError) as failed:
        client.request_json("POST", "/api/projects/1/import", json=[{"data": {}}])
    assert len(seen) == 4  # sent once: the import may have happened behind the gateway
    assert (failed.value.status, failed.value.path) == (502, "/api/projects/1/import")
    assert "Bad Gateway" in failed.value.message


def test_gets_give_up_after_the_attempts_with_the_servers_message():
    client, seen = scripted(lambda request: httpx.Response(503, json={"detail": "maintenance"}))
    with pytest.raises(LabelStudioError, match="maintenance") as failed:
        client.request_json("GET", "/api/projects/")
    assert (failed.value.status, len(seen)) == (503, 3)


def test_validation_errors_are_reported():
    body = {"detail": "Validation error", "validation_errors": {"title": ["Ensure this field has..."]}}
    client, _ = scripted(lambda request: httpx.Response(400, json=body))
    with pytest.raises(LabelStudioError, match="Ensure this field") as failed:
        client.request_json("POST", "/api/projects/", json={"title": "x"})
    assert failed.value.status == 400


def test_unreachable_server_is_a_label_studio_error():
    def handler(request: httpx.Request) -> httpx.Response:
        raise httpx.ConnectError("connection refused", request=request)

    client, seen = scripted(handler)
    with pytest.raises(LabelStudioError, match="ConnectError") as failed:
        client.request_json("POST", "/api/projects/", json={})
    assert (failed.value.status, len(seen)) == (None, 3)  # never sent: safe to retry even a POST


def test_background_import_is_waited_for():
    """The Enterprise edition answers an import with a job id; the created count comes from the job."""
    statuses = iter(["created", "in_progress", "completed"])

    def handler(request: httpx.Request) -> httpx.Response:
        path = request.url.path
        if path == "/api/tasks/":
            return httpx.Response(200, json={"total": 0, "tasks": []})
        if path == "/api/projects/4/import":
            return httpx.Response(201, json={"import": 9})
        assert path == "/api/projects/4/imports/9/"
        return httpx.Response(200, json={"status": next(statuses), "task_count": 2})

    client, seen = scripted(handler)
    result = client.import_tasks(4, [review_task("a"), review_task("b")])
    assert (result.created, result.skipped) == (2, 0)
    assert [r.url.path for r in seen].count("/api/projects/4/imports/9/") == 3


def test_local_file_url_quotes_the_path():
    assert local_file_url("shard 0/a#1.png") == "/data/local-files/?d=shard%200/a%231.png"
    assert local_file_url("/imgs/./b.jpg") == "/data/local-files/?d=imgs/b.jpg"
    with pytest.raises(ValueError):
        local_file_url("../etc/passwd")


def test_a_server_that_cannot_start_fails_with_its_log(tmp_path):
    """This interpreter has no Label Studio: the server exits at once, and the error shows why."""
    with pytest.raises(RuntimeError, match="(?s)exited with status.*No module named") as failed:
        start_label_studio(sys.executable, tmp_path / "data", tmp_path / "files", timeout_s=60)
    assert str(tmp_path / "data" / "server.log") in str(failed.value)


def test_token_kind_is_told_by_shape():
    assert is_personal_access_token(jwt({"token_type": "refresh"}))
    assert not is_personal_access_token("3f" * 20)
    assert not is_personal_access_token("a.b.c")  # three parts, but no JSON header
