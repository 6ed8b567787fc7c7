"""cloudckpt.remote.RemoteStore: what is not a backend's conformance (test_conformance.py runs that on every
backend): here, the s3fs instances stores share."""

from __future__ import annotations

import sys
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


# -- the default credential chain on the s3fs path (no server: a client is built, never used) -------------------
def _default_chain_only(monkeypatch, tmp_path, config: str = "") -> None:
    """No credential but what the test sets: no metadata service, no profile, empty config files."""
    monkeypatch.setenv("AWS_EC2_METADATA_DISABLED", "true")
    for name in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_SESSION_TOKEN", "AWS_PROFILE",
                 "AWS_DEFAULT_PROFILE"):
        monkeypatch.delenv(name, raising=False)
    (tmp_path / "config").write_text(config)
    monkeypatch.setenv("AWS_CONFIG_FILE", str(tmp_path / "config"))
    monkeypatch.setenv("AWS_SHARED_CREDENTIALS_FILE", str(tmp_path / "none"))


def _s3fs_signs_with(store: RemoteStore) -> str:
    """The access key the store's s3fs client signs with (building the client: no request is sent)."""
    store.fs.connect()
    return store.fs.s3._request_signer._credentials.access_key


def test_a_store_made_after_environment_keys_rotate_lists_with_the_new_keys(monkeypatch, tmp_path):
    """Listings, small objects and deletes go through s3fs; a new store's s3fs client must sign with the AWS_*
    environment of now, not with what the process's first client resolved (the shared aiobotocore session
    keeps the default chain's credentials once resolved)."""
    _default_chain_only(monkeypatch, tmp_path)
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "first-key")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "first-secret")
    options = {"endpoint_url": "http://127.0.0.1:9"}
    first = RemoteStore("s3://bucket/run", options)
    assert _s3fs_signs_with(first) == "first-key"
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "rotated-key")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "rotated-secret")
    store = RemoteStore("s3://bucket/run", options)
    assert store._transport is not None and store._transport._credentials()[0] == "rotated-key"
    assert _s3fs_signs_with(store) == "rotated-key"  # was first-key: the two halves of one store disagreed
    # a session of its own, but not a second parse of botocore's S3 model (0.2-0.5 CPU-s): one loader
    assert store.fs.session is not first.fs.session
    assert store.fs.session.get_component("data_loader") is first.fs.session.get_component("data_loader")


def test_a_store_made_after_a_credential_failure_resolves_the_credentials_again(monkeypatch, tmp_path):
    """After a request is refused for its credentials the shared client is dropped (``_forget_s3fs``) so that
    the next store "builds a client that resolves credentials again": with credentials from the default chain
    (here a credential_process handing out a new key at each call) it must really resolve them again."""
    counter = tmp_path / "calls"
    script = tmp_path / "creds.py"
    script.write_text(
        "import json, pathlib\n"
        f"p = pathlib.Path({str(counter)!r})\n"
        "n = int(p.read_text()) + 1 if p.exists() else 1\n"
        "p.write_text(str(n))\n"
        "print(json.dumps({'Version': 1, 'AccessKeyId': f'key-{n}', 'SecretAccessKey': 's'}))\n")
    _default_chain_only(monkeypatch, tmp_path, f"[default]\ncredential_process = {sys.executable} {script}\n")
    options = {"endpoint_url": "http://127.0.0.1:9"}
    first = RemoteStore("s3://bucket/run", options)
    signed = _s3fs_signs_with(first)
    assert signed.startswith("key-")  # (the transport of a store resolves them too: not necessarily key-1)
    from cloudckpt.remote import _forget_s3fs

    _forget_s3fs(first.fs)  # what RemoteStore._run does on InvalidAccessKeyId, ExpiredToken...
    again = RemoteStore("s3://bucket/run", options)
    assert again.fs is not first.fs
    assert _s3fs_signs_with(again) != signed  # was the same: the shared session kept what it first resolved
    assert again._transport is not None and first._transport is not None
    assert again._transport._credentials()[0] != first._transport._credentials()[0]  # the transport's session too
