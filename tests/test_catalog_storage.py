"""The object stores the catalog snapshot writes through: local directory and S3 (moto on 127.0.0.1)."""

from __future__ import annotations

import os

import pandas as pd
import pytest

from pseudolabel.storage import LocalObjectStore, ObjectNotFound, read_parquet, write_parquet
from pseudolabel.storage.base import clean_key


def test_put_get_exists_delete(store):
    assert not store.exists("a/b.bin")
    store.put_bytes("a/b.bin", b"one")
    store.put_bytes("a/b.bin", b"two")  # replaces
    assert store.exists("a/b.bin")
    assert store.get_bytes("a/b.bin") == b"two"
    store.delete("a/b.bin")
    store.delete("a/b.bin")  # deleting a missing key is fine
    assert not store.exists("a/b.bin")
    with pytest.raises(ObjectNotFound):
        store.get_bytes("a/b.bin")


def test_list_is_recursive_sorted_and_prefix_filtered(store):
    for key in ["catalog/s2/part-1", "catalog/s1/part-0", "catalog/CURRENT.json", "other/y", "z"]:
        store.put_bytes(key, key.encode())
    assert [info.key for info in store.list("catalog")] == [
        "catalog/CURRENT.json",
        "catalog/s1/part-0",
        "catalog/s2/part-1",
    ]
    assert [info.key for info in store.list("catalog/s")] == ["catalog/s1/part-0", "catalog/s2/part-1"]
    assert {info.key: info.size for info in store.list("other")} == {"other/y": 7}
    assert store.delete_prefix("catalog/s1") == 1
    assert [info.key for info in store.list()] == [
        "catalog/CURRENT.json",
        "catalog/s2/part-1",
        "other/y",
        "z",
    ]


def test_a_trailing_slash_limits_the_prefix_to_a_directory(store):
    store.put_bytes("images/shard-00001/a.jpg", b"x")
    store.put_bytes("images/shard-00001.parquet", b"y")
    assert [info.key for info in store.list("images/shard-00001/")] == ["images/shard-00001/a.jpg"]
    assert len(list(store.list("images/shard-00001"))) == 2  # without the slash it is a plain prefix
    assert store.delete_prefix("images/shard-00001/") == 1
    assert store.exists("images/shard-00001.parquet")


def test_json_and_parquet_round_trip(store):
    store.put_json("p.json", {"rows": 3, "parts": ["a"]})
    assert store.get_json("p.json") == {"rows": 3, "parts": ["a"]}
    frame = pd.DataFrame({"url": ["u1", "u2"], "label": ["oak", None]})
    assert write_parquet(store, "t.parquet", frame) > 0
    assert read_parquet(store, "t.parquet").to_pylist() == [
        {"url": "u1", "label": "oak"},
        {"url": "u2", "label": None},
    ]


def test_keys_cannot_escape_the_store(store):
    with pytest.raises(ValueError, match=r"'\.\.'"):
        store.put_bytes("../outside", b"x")
    with pytest.raises(ValueError, match=r"'\.\.'"):
        clean_key("a/../../b")
    assert clean_key("./a//b/") == "a/b"


def test_local_writes_are_atomic_and_leave_no_temp_files(tmp_path, monkeypatch):
    store = LocalObjectStore(tmp_path)
    store.put_bytes("d/k", b"first")
    real_fdopen = os.fdopen

    def fdopen_failing_mid_write(*args, **kwargs):
        with real_fdopen(*args, **kwargs) as handle:
            handle.write(b"partial")
        raise OSError("disk full")

    monkeypatch.setattr(os, "fdopen", fdopen_failing_mid_write)
    with pytest.raises(OSError, match="disk full"):
        store.put_bytes("d/k", b"second")
    monkeypatch.undo()
    assert store.get_bytes("d/k") == b"first"  # readers still see the old object
    assert [p.name for p in (tmp_path / "d").iterdir()] == ["k"]  # no .tmp-* file left behind
    store.put_bytes("d/k", b"second")
    assert [p.name for p in (tmp_path / "d").iterdir()] == ["k"]
