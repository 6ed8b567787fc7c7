"""cloudckpt.remote.RemoteStore: what is not a backend's conformance (test_conformance.py runs that on every
backend): here, the s3fs instances stores share."""

from __future__ import annotations

from cloudckpt.remote import RemoteStore


def test_stores_with_the_same_options_share_one_s3fs_client(cloudckpt_s3):
    """Every RemoteStore used to build an s3fs filesystem of its own, whose first request built its aiobotocore
    client (30-50 ms: a third of a small download_checkpoint). Stores with the same options now share one, and
    its client: a second store's first listing costs what a used one's does. Other options (another key), another
    instance: what a store sends is never decided by another's options."""
    first = RemoteStore(cloudckpt_s3.url("a"), cloudckpt_s3.storage_options)
    first.write_atomic("x", b"1")
    assert [o.name for o in first.list_objects()] == ["x"]
    client = first.fs._s3
    assert client is not None
    second = RemoteStore(cloudckpt_s3.url("b"), dict(cloudckpt_s3.storage_options))
    assert second.fs is first.fs
    assert second.list_objects() == []
    assert second.fs._s3 is client  # no client built for it
    assert [o.name for o in RemoteStore(cloudckpt_s3.url("a"), cloudckpt_s3.storage_options).list_objects()] == ["x"]
    other = RemoteStore(cloudckpt_s3.url("a"), {**cloudckpt_s3.storage_options, "secret": "another"})
    assert other.fs is not first.fs
