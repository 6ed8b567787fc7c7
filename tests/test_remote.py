"""cloudckpt.remote.RemoteStore: what is not a backend's conformance (test_conformance.py runs that on every
backend): here, the s3fs instances stores share."""

from __future__ import annotations

import uuid

import pytest

import cloudckpt
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


def test_stores_given_their_own_event_loop_do_not_share_a_client(cloudckpt_s3):
    """Options are told apart by their text: two event loops print alike, so options holding objects (a loop, a
    session) are never shared; a store would otherwise run its requests on another store's loop."""
    import asyncio

    loops = [asyncio.new_event_loop() for _ in range(2)]
    try:
        a, b = (RemoteStore(cloudckpt_s3.url("a"), {**cloudckpt_s3.storage_options, "loop": loop}) for loop in loops)
        assert a.fs is not b.fs
        assert (a.fs.loop, b.fs.loop) == (loops[0], loops[1])
    finally:
        for loop in loops:
            loop.close()


def test_a_store_whose_credentials_fail_is_not_shared_again(seaweed_server, monkeypatch):
    """A shared s3fs client keeps the credentials it resolved at its first request: after a request fails for want
    of valid ones, new stores get a new client (as each store had before), and a change of the AWS_* environment
    gives them another too."""
    bucket = "cred-" + uuid.uuid4().hex[:8]
    seaweed_server.create_bucket(bucket)
    wrong = {**seaweed_server.storage_options, "secret": "not-the-secret"}
    first = RemoteStore(f"s3://{bucket}/run", wrong)
    assert RemoteStore(f"s3://{bucket}/other", wrong).fs is first.fs
    with pytest.raises(cloudckpt.RemoteError):
        first.list_objects()
    assert RemoteStore(f"s3://{bucket}/run", wrong).fs is not first.fs
    right = RemoteStore(f"s3://{bucket}/run", seaweed_server.storage_options)
    monkeypatch.setenv("AWS_DEFAULT_REGION", "eu-west-3")
    assert RemoteStore(f"s3://{bucket}/run", seaweed_server.storage_options).fs is not right.fs
