"""The bad-input table: each mistake gets a clear error naming the value, and nothing looks committed."""

from __future__ import annotations

import json
import os
import urllib.request
import uuid

import pytest

import cloudckpt
from cloudckpt.embedded import EmbeddedS3, free_port
from cloudckpt.remote import RemoteStore, open_directory
from support.moto_iam import IamMoto
from support.checks import manifests
from support.tf_model import train


def hook_for(url, tmp_path, options=None, **kwargs):
    return lambda s: cloudckpt.CheckpointSaverHook(url, save_steps=5, local_dir=str(tmp_path / "local"),
                                                   storage_options=options, **kwargs)


def test_unknown_protocol(tmp_path):
    with pytest.raises(cloudckpt.ConfigError) as info:
        cloudckpt.CheckpointSaverHook("nosuchproto://bucket/run", save_steps=5, local_dir=str(tmp_path))
    assert "Unknown protocol 'nosuchproto'" in str(info.value) and "nosuchproto://bucket/run" in str(info.value)


def test_bucket_does_not_exist(moto_server, tmp_path):
    url = f"s3://no-such-bucket-{uuid.uuid4().hex[:8]}/run"
    with pytest.raises(cloudckpt.ConfigError) as info:
        train(hook_for(url, tmp_path, moto_server.storage_options), last_step=5)
    bucket = url[5:].split("/")[0]
    assert f"Bucket '{bucket}'" in str(info.value) and "does not exist" in str(info.value)
    assert not (tmp_path / "local" / "model.ckpt-0.index").exists()  # failed before training started


def set_moto_auth(endpoint: str, allowed_unauthenticated: str) -> None:
    """moto's auth switch is process-wide (all in-process servers): always switch it back."""
    request = urllib.request.Request(f"{endpoint}/moto-api/reset-auth", method="POST",
                                     data=allowed_unauthenticated.encode(), headers={"Content-Type": "text/plain"})
    urllib.request.urlopen(request).read()


def test_credentials_rejected(tmp_path):
    with EmbeddedS3() as server:
        url = server.create_bucket(f"ckpt-{uuid.uuid4().hex[:8]}") + "/run"
        options = {**server.storage_options, "key": "AKIAWRONGWRONGWRONG1", "secret": "not-the-secret"}
        set_moto_auth(server.endpoint, "0")
        try:
            with pytest.raises(cloudckpt.RemoteError) as info:
                train(hook_for(url, tmp_path, options), last_step=5)
        finally:
            set_moto_auth(server.endpoint, "inf")
    message = str(info.value)
    assert url in message and "rejected the credentials" in message
    assert "not-the-secret" not in message and "AKIAWRONG" not in message  # never echo credentials
    assert not info.value.transient


def test_local_dir_not_writable(memory_url, tmp_path):
    blocker = tmp_path / "a-file"
    blocker.write_text("x")
    with pytest.raises(cloudckpt.ConfigError) as info:
        cloudckpt.CheckpointSaverHook(memory_url, save_steps=5, local_dir=str(blocker / "sub"))
    assert f"local_dir '{blocker / 'sub'}' is not writable" in str(info.value)


def test_checkpoint_dir_is_an_object(moto_server, tmp_path):
    bucket = f"ckpt-{uuid.uuid4().hex[:12]}"
    moto_server.create_bucket(bucket)
    moto_server.client().put_object(Bucket=bucket, Key="runs/exp1", Body=b"not a directory")
    url = f"s3://{bucket}/runs/exp1"
    with pytest.raises(cloudckpt.ConfigError) as info:
        train(hook_for(url, tmp_path, moto_server.storage_options), last_step=5)
    assert f"checkpoint_dir '{url}' is an object, not a directory" in str(info.value)


def test_checkpoint_dir_is_a_local_file(tmp_path):
    path = tmp_path / "file"
    path.write_text("x")
    with pytest.raises(cloudckpt.ConfigError) as info:
        cloudckpt.CheckpointSaverHook(str(path), save_steps=5)
    assert f"checkpoint_dir '{path}' is a file, not a directory" in str(info.value)
    with pytest.raises(cloudckpt.ConfigError) as info:
        train(lambda s: cloudckpt.CheckpointSaverHook(f"file://{path}", save_steps=5,
                                                      local_dir=str(tmp_path / "l")), last_step=5)
    assert "is a file, not a directory" in str(info.value) and str(path) in str(info.value)


@pytest.mark.parametrize("kwargs, fragment", [
    ({"save_steps": 0}, "save_steps must be a positive integer, got 0"),
    ({"save_steps": -3}, "save_steps must be a positive integer, got -3"),
    ({"save_secs": 0}, "save_secs must be a positive number of seconds, got 0"),
    ({"save_secs": -1.5}, "save_secs must be a positive number of seconds, got -1.5"),
])
def test_non_positive_schedule(kwargs, fragment, memory_url, tmp_path):
    with pytest.raises(ValueError, match=fragment):
        cloudckpt.CheckpointSaverHook(memory_url, local_dir=str(tmp_path), **kwargs)


def test_a_bad_remote_max_to_keep_is_named_as_the_hooks_argument(memory_url, tmp_path):
    with pytest.raises(cloudckpt.ConfigError, match="remote_max_to_keep must be an integer >= 0"):
        cloudckpt.CheckpointSaverHook(memory_url, local_dir=str(tmp_path), save_steps=5, remote_max_to_keep=2.0)


@pytest.mark.parametrize("kwargs", [{"save_steps": "np.int64(5)"}, {"save_secs": "np.float32(2.5)"},
                                    {"save_secs": "np.int64(3)"}])
def test_a_numpy_schedule_is_taken(kwargs, memory_url, tmp_path):
    import numpy as np

    hook = cloudckpt.CheckpointSaverHook(memory_url, local_dir=str(tmp_path),
                                         **{k: eval(v, {"np": np}) for k, v in kwargs.items()})
    assert hook.checkpoint_url == memory_url


@pytest.fixture
def committed_dir(tmp_path):
    url = f"memory://ckpt-{uuid.uuid4().hex[:8]}/run"
    train(hook_for(url, tmp_path), last_step=5)  # commits steps 0 and 5
    import fsspec
    fs, root = fsspec.core.url_to_fs(url)
    return url, fs, root


def test_malformed_manifest_json(committed_dir, tmp_path):
    url, fs, root = committed_dir
    fs.pipe_file(f"{root}/model.ckpt-5.manifest.json", b'{"format": "cloudckpt.manifest", "vers')
    with pytest.raises(cloudckpt.ManifestError) as info:
        cloudckpt.list_checkpoints(url)
    assert f"{url}/model.ckpt-5.manifest.json is not valid JSON" in str(info.value)
    with pytest.raises(cloudckpt.ManifestError):
        cloudckpt.download_checkpoint(url, str(tmp_path / "dl"), step=5)


def test_manifest_from_newer_version(committed_dir):
    url, fs, root = committed_dir
    doc = json.loads(fs.cat_file(f"{root}/model.ckpt-5.manifest.json"))
    doc["version"] = 3  # version 2 (commit log fields) is the newest this cloudckpt reads
    fs.pipe_file(f"{root}/model.ckpt-5.manifest.json", json.dumps(doc).encode())
    with pytest.raises(cloudckpt.ManifestError) as info:
        cloudckpt.latest_checkpoint(url)
    assert "format version 3" in str(info.value) and "Upgrade cloudckpt" in str(info.value)


def test_manifest_naming_a_missing_file(committed_dir, tmp_path):
    url, fs, root = committed_dir
    fs.rm_file(f"{root}/model.ckpt-5.index")
    with pytest.raises(cloudckpt.IntegrityError) as info:
        cloudckpt.download_checkpoint(url, str(tmp_path / "dl"))
    assert f"{url}/model.ckpt-5.index: the manifest names it but it does not exist" in str(info.value)
    assert not os.path.exists(tmp_path / "dl" / "checkpoint")
    assert [f.status for f in cloudckpt.verify(url).problems] == ["missing"]


@pytest.mark.parametrize("bad", ["missing-step", "bad-crc", "path-in-name"])
def test_manifest_schema_errors(committed_dir, bad):
    url, fs, root = committed_dir
    doc = json.loads(fs.cat_file(f"{root}/model.ckpt-5.manifest.json"))
    if bad == "missing-step":
        del doc["step"]
    elif bad == "bad-crc":
        doc["files"][0]["crc32c"] = "XYZ"
    else:
        doc["files"][0]["name"] = "../../etc/passwd"
    fs.pipe_file(f"{root}/model.ckpt-5.manifest.json", json.dumps(doc).encode())
    with pytest.raises(cloudckpt.ManifestError, match="malformed field"):
        cloudckpt.list_checkpoints(url)


def test_config_errors_leave_nothing_committed(moto_server, tmp_path):
    bucket = f"ckpt-{uuid.uuid4().hex[:12]}"
    moto_server.create_bucket(bucket)
    moto_server.client().put_object(Bucket=bucket, Key="runs/exp1", Body=b"x")
    with pytest.raises(cloudckpt.ConfigError):
        train(hook_for(f"s3://{bucket}/runs/exp1", tmp_path, moto_server.storage_options), last_step=5)
    assert manifests(f"s3://{bucket}/runs", moto_server.storage_options) == {}
    assert manifests(f"s3://{bucket}", moto_server.storage_options) == {}


def test_credentials_in_urls_and_tokens_are_redacted():
    from cloudckpt.remote import redact, remote_error

    text = ("GET https://oauth2.googleapis.com/tokeninfo?access_token=ya29.SECRET&x=1 failed; "
            "http://user:hunter2@proxy:8080/ and s3://b/k?X-Amz-Signature=abcdef")
    cleaned = redact(text)
    assert "ya29.SECRET" not in cleaned and "hunter2" not in cleaned and "abcdef" not in cleaned
    assert "access_token=***" in cleaned and "http://***@proxy" in cleaned
    error = remote_error("connect to", "s3://user:pw@bucket/x", ConnectionError(text))
    assert "hunter2" not in str(error) and "ya29.SECRET" not in str(error) and ":pw@" not in str(error)


@pytest.mark.parametrize("retries, said", [(1, "retried 1 time over 3 s"), (4, "retried 4 times over 3 s")])
def test_a_transient_failure_says_how_often_it_was_retried(retries, said):
    from cloudckpt.remote import remote_error

    error = remote_error("list", "s3://bucket/run", ConnectionRefusedError(111, "Connection refused"),
                         retried=(retries, 3.2), endpoint="http://127.0.0.1:9")
    assert said in str(error), str(error)


def test_a_transfer_cancelled_on_purpose_says_so_not_to_rerun_at_debug():
    """An abandoned upload (Ctrl-C, close, a preemption deadline) logged "cause: TransferCancelled; rerun with
    logging at DEBUG for details", pointless for a deliberate abandon (spot-VM trial)."""
    from cloudckpt.remote import remote_error
    from cloudckpt.cancel import TransferCancelled

    message = str(remote_error("upload", "s3://bucket/run/model.ckpt-5.index", TransferCancelled("cancelled")))
    assert "cancelled on purpose" in message and "rerun with logging" not in message, message


def test_a_request_cut_by_a_cancel_says_cancelled_not_unreachable():
    """A request in flight is cut by shutting its socket: its TransferCancelled carries the socket's error as
    cause. The message said "the store could not be reached ... check endpoint_url" (a preemption's abandoned
    upload, spot-VM trial): it was cancelled on purpose."""
    from cloudckpt.remote import remote_error
    from cloudckpt.cancel import TransferCancelled

    try:
        try:
            raise ConnectionResetError(104, "Connection reset by peer")
        except ConnectionResetError as exc:
            raise TransferCancelled("transfer of bucket/run/model.ckpt-5.index cancelled") from exc
    except TransferCancelled as exc:
        cut = exc
    message = str(remote_error("upload", "s3://bucket/run/model.ckpt-5.index", cut, retried=(0, 3.0),
                               endpoint="http://127.0.0.1:9"))
    assert "cancelled on purpose" in message and "could not be reached" not in message, message


@pytest.mark.parametrize("options, missing", [({"key": "AKIAEXAMPLEKEY"}, "without its secret"),
                                             ({"secret": "example-secret-value"}, "without its access key"),
                                             ({"client_kwargs": {"aws_access_key_id": "AKIAEXAMPLEKEY"}},
                                              "without its secret")])
def test_an_s3_key_without_its_secret_is_a_config_error_at_once(options, missing):
    """Was a RemoteError at the first request (botocore's PartialCredentialsError; CLI exit 1, not 2)."""
    with pytest.raises(cloudckpt.ConfigError) as info:
        RemoteStore("s3://bucket/run", {"endpoint_url": "http://127.0.0.1:9", **options})
    message = str(info.value)
    assert missing in message and "s3://bucket/run" in message, message
    assert "AKIAEXAMPLEKEY" not in message and "example-secret-value" not in message, message


@pytest.mark.parametrize("options, said", [
    ({"endpoint_url": "http://127.0.0.1:abc"}, "was not a valid URI"),
    ({"endpoint_url": "http://127.0.0.1:9", "client_kwargs": {"region_name": "not a region"}}, "region_name")])
def test_options_botocore_refuses_at_the_first_request_are_a_config_error(options, said):
    """botocore checks a region's or an endpoint's form only when a client is made (the first request): that is
    the user's configuration, a ConfigError (CLI exit 2), no longer a RemoteError (exit 1) like a store failure."""
    store = RemoteStore("s3://bucket/run", {"key": "AKIAEXAMPLEKEY", "secret": "example-secret-value", **options})
    with pytest.raises(cloudckpt.ConfigError) as info:
        store.list_objects()
    message = str(info.value)
    assert message.startswith("Invalid storage_options for s3://bucket/run: ") and said in message, message
    assert "example-secret-value" not in message, message


def test_manifest_that_names_another_checkpoint_is_not_trusted(committed_dir):
    url, fs, root = committed_dir
    doc = json.loads(fs.cat_file(f"{root}/model.ckpt-5.manifest.json"))
    fs.pipe_file(f"{root}/model.ckpt-7.manifest.json", json.dumps(doc).encode())  # a copy under another name
    assert [c.step for c in cloudckpt.list_checkpoints(url)] == [0, 5]  # no commit entry names it: debris
    zero = fs.cat_file(f"{root}/model.ckpt-0.manifest.json")
    fs.pipe_file(f"{root}/model.ckpt-5.manifest.json", zero)  # the committed name now describes step 0
    with pytest.raises(cloudckpt.ManifestError, match="not the checkpoint its name says"):
        cloudckpt.list_checkpoints(url)


@pytest.mark.parametrize("error", [
    cloudckpt.ConfigError("bad"),
    cloudckpt.RemoteError("gone", url="s3://b/run", transient=True),
    cloudckpt.UploadError("not committed", url="s3://b/run", step=5),
    cloudckpt.FencedError("fenced", url="s3://b/run", step=6, newer_writer="w2"),
    cloudckpt.IntegrityError("crc"),
    cloudckpt.WorkerFailedError("worker:1 failed", workers=("worker:1",), errors=("UploadError",)),
], ids=lambda e: type(e).__name__)
def test_errors_pickle_with_their_attributes(error):
    """multiprocessing and Ray send exceptions pickled: keyword-only constructors must not break that."""
    import pickle

    back = pickle.loads(pickle.dumps(error))
    assert type(back) is type(error) and str(back) == str(error) and back.args == error.args
    assert vars(back) == vars(error)


# -- review 16, items 7 and 8: a missing bucket, missing permissions, an unreachable endpoint -----------------
def test_a_missing_bucket_is_said_by_every_entry_point(moto_server, tmp_path):
    """Reads too: not "no committed checkpoint" nor an empty list, as CheckpointManager and the CLI say it."""
    bucket = f"no-such-bucket-{uuid.uuid4().hex[:8]}"
    url, options = f"s3://{bucket}/run", moto_server.storage_options
    calls = {"download_checkpoint": lambda: cloudckpt.download_checkpoint(url, str(tmp_path / "d"),
                                                                          storage_options=options),
             "list_checkpoints": lambda: cloudckpt.list_checkpoints(url, options),
             "latest_checkpoint": lambda: cloudckpt.latest_checkpoint(url, options),
             "verify": lambda: cloudckpt.verify(url, storage_options=options),
             "pull_checkpoint": lambda: cloudckpt.pull_checkpoint(url, str(tmp_path / "p"), storage_options=options)}
    for name, call in calls.items():
        with pytest.raises(cloudckpt.ConfigError) as info:
            call()
        assert f"Bucket '{bucket}' of checkpoint URL '{url}' does not exist" in str(info.value), name


def test_missing_permissions_are_named_never_a_missing_bucket(tmp_path):
    """A read-only user (s3:GetObject and s3:ListBucket) may open a new prefix of the bucket; its first write
    fails naming s3:PutObject and the directory, the S3 error said once. A user without any permission is told
    s3:ListBucket. Neither hears that the bucket does not exist (s3fs's bucket probe answers False on a 403)."""
    import boto3

    with IamMoto() as aws:
        iam = boto3.client("iam", endpoint_url=aws.endpoint, region_name="us-east-1",
                           aws_access_key_id=aws.admin_options["key"],
                           aws_secret_access_key=aws.admin_options["secret"])
        users = {}
        for user, actions in (("reader", ["s3:GetObject", "s3:ListBucket"]), ("nobody", None)):
            iam.create_user(UserName=user)
            if actions:
                iam.put_user_policy(UserName=user, PolicyName="p", PolicyDocument=json.dumps(
                    {"Version": "2012-10-17", "Statement": [{"Effect": "Allow", "Action": actions, "Resource": [
                        f"arn:aws:s3:::{aws.bucket}", f"arn:aws:s3:::{aws.bucket}/*"]}]}))
            key = iam.create_access_key(UserName=user)["AccessKey"]
            users[user] = {"endpoint_url": aws.endpoint, "key": key["AccessKeyId"], "secret": key["SecretAccessKey"]}
        url = f"s3://{aws.bucket}/runs/new"
        store = open_directory(url, users["reader"])  # the bucket is there: no ConfigError
        with pytest.raises(cloudckpt.RemoteError) as info:
            store.write_if_absent("entry.json", b"{}")
        with pytest.raises(cloudckpt.RemoteError) as denied:
            cloudckpt.list_checkpoints(url, users["nobody"])
    message = str(info.value)
    assert f"s3:PutObject permission on {url}" in message and "does not exist" not in message
    assert message.count("AccessDenied") == 1 and "Errno" not in message and not info.value.transient
    assert f"s3:ListBucket permission on {url}" in str(denied.value)
    assert "does not exist" not in str(denied.value)


def test_an_unreachable_endpoint_says_what_was_retried_and_what_to_check(tmp_path):
    """Connection refused: retried (a store restarting is real), then said with the endpoint, the retries
    and what to check; on the listing path (s3fs) and the data path (cloudckpt's transport) alike."""
    endpoint = f"http://127.0.0.1:{free_port()}"
    options = {"endpoint_url": endpoint, "key": "k", "secret": "s"}
    retry = cloudckpt.RetryPolicy(max_attempts=3, initial_backoff=0.01, max_backoff=0.01)
    with pytest.raises(cloudckpt.RemoteError) as listing:
        open_directory("s3://bucket/run", options, retry=retry)
    with pytest.raises(cloudckpt.RemoteError) as download:
        RemoteStore("s3://bucket/run", options, retry=retry).get_file("model.ckpt-1.index", str(tmp_path / "x"))
    for error in (listing.value, download.value):
        message = str(error)
        assert error.transient and "s3://bucket/run" in message and f"could not be reached at {endpoint}" in message
        assert "retried 2 times over" in message and "check endpoint_url" in message


# -- helper audit: wrong types and malformed URLs are ConfigErrors naming the argument, before any request ---------

def _entry_points(url, options, tmp_path, **hook_kwargs):
    """Every public way in to a checkpoint directory, each called with ``url`` and ``options``."""
    import tensorflow as tf

    return {
        "CheckpointSaverHook": lambda: cloudckpt.CheckpointSaverHook(url, save_steps=5, storage_options=options,
                                                                     local_dir=str(tmp_path / "h"), **hook_kwargs),
        "CheckpointManager": lambda: cloudckpt.CheckpointManager(tf.train.Checkpoint(v=tf.Variable(1.0)), url,
                                                                 max_to_keep=1, storage_options=options,
                                                                 local_dir=str(tmp_path / "m")),
        "list_checkpoints": lambda: cloudckpt.list_checkpoints(url, options),
        "download_checkpoint": lambda: cloudckpt.download_checkpoint(url, str(tmp_path / "d"),
                                                                     storage_options=options),
        "pull_checkpoint": lambda: cloudckpt.pull_checkpoint(url, str(tmp_path / "p"), storage_options=options),
        "verify": lambda: cloudckpt.verify(url, storage_options=options),
    }


@pytest.mark.parametrize("url, fragment", [
    (None, "must be a non-empty local path or URL string"),  # was a TypeError from os.fspath, naming nothing
    (5, "got a value of type int"),
    (b"s3://bucket/run", "got a value of type bytes"),  # was "cannot use a string pattern on a bytes-like object"
    ("s3://", "names no bucket"),  # was "written with a slash missing"
    ("s3:///run", "names no bucket"),  # was "Bucket '' ... does not exist", after a request
    ("gs://", "names no bucket"),
    ("s3://my bucket/run", "is not a valid S3 bucket name"),  # was botocore's "Parameter validation failed:"
])
def test_unusable_checkpoint_urls_are_config_errors_before_any_request(url, fragment, moto_server, tmp_path):
    for name, call in _entry_points(url, moto_server.storage_options, tmp_path).items():
        with pytest.raises(cloudckpt.ConfigError) as info:
            call()
        assert fragment in str(info.value), name
        if not isinstance(url, str):
            assert ("directory" if name == "CheckpointManager" else "checkpoint_dir") in str(info.value), name


@pytest.mark.parametrize("options", [["endpoint_url=http://127.0.0.1:9"], "endpoint_url=http://127.0.0.1:9"])
def test_storage_options_that_are_not_a_mapping(options, tmp_path):
    """Was an AttributeError ('list' object has no attribute 'items') or dict()'s ValueError; the values are
    never shown (they may be credentials)."""
    for name, call in _entry_points("s3://bucket/run", options, tmp_path).items():
        with pytest.raises(cloudckpt.ConfigError) as info:
            call()
        assert "storage_options must be a dict" in str(info.value), name
        assert "127.0.0.1" not in str(info.value), name
    with pytest.raises(cloudckpt.ConfigError, match="storage_options must be a dict"):
        cloudckpt.CheckpointSaverHook("s3://bucket/run", save_steps=5, storage_options=options)  # default local_dir


@pytest.mark.parametrize("kwargs, fragment", [
    ({"retry": 3}, "retry must be a cloudckpt.RetryPolicy or None, got a value of type int"),  # was accepted
    ({"exit_on_preemption": "yes"}, "exit_on_preemption must be True"),  # was int()'s "invalid literal"
    ({"exit_on_preemption": 300}, "exit code in [0, 255], got 300"),
])
def test_hook_arguments_of_the_wrong_kind(kwargs, fragment, memory_url, tmp_path):
    with pytest.raises(cloudckpt.ConfigError) as info:
        cloudckpt.CheckpointSaverHook(memory_url, save_steps=5, local_dir=str(tmp_path / "l"), **kwargs)
    assert fragment in str(info.value)


def test_mistyped_url_with_local_dir_is_named_as_a_mistyped_url(tmp_path):
    """'s3:/bucket/run' with local_dir: was "local_dir was given but checkpoint_dir ... is a local path"."""
    with pytest.raises(cloudckpt.ConfigError, match="written with a slash missing"):
        cloudckpt.CheckpointSaverHook("s3:/bucket/run", save_steps=5, local_dir=str(tmp_path / "l"))
    assert not os.path.exists("s3:")


def test_downloads_into_a_file_or_no_path_are_refused_and_the_file_kept(committed_dir, tmp_path):
    url, _, _ = committed_dir
    target = tmp_path / "a-file"
    target.write_bytes(b"keep me")
    for call in (cloudckpt.download_checkpoint, cloudckpt.pull_checkpoint):
        with pytest.raises(cloudckpt.ConfigError, match="is a file, not a directory"):
            call(url, str(target))
        with pytest.raises(cloudckpt.ConfigError, match="local_dir must be a non-empty"):
            call(url, None)  # was stat()'s TypeError
    assert target.read_bytes() == b"keep me"


def test_a_local_file_as_the_directory_of_a_read_is_named(tmp_path):
    """list_checkpoints / latest_checkpoint / verify on a file: was an empty list, None, 'No committed checkpoint'."""
    path = tmp_path / "model.ckpt-5.index"
    path.write_bytes(b"not a directory")
    calls = {"list_checkpoints": lambda: cloudckpt.list_checkpoints(str(path)),
             "latest_checkpoint": lambda: cloudckpt.latest_checkpoint(str(path)),
             "verify": lambda: cloudckpt.verify(str(path)),
             "download_checkpoint": lambda: cloudckpt.download_checkpoint(str(path), str(tmp_path / "d"))}
    for name, call in calls.items():
        with pytest.raises(cloudckpt.ConfigError) as info:
            call()
        assert f"{str(path)!r} is a file, not a directory" in str(info.value), name
    assert path.read_bytes() == b"not a directory"


@pytest.mark.parametrize("n, text", [(0, "0 B"), (307, "307 B"), (1023, "1023 B"), (1024, "1.0 KiB"),
                                     (12_595, "12.3 KiB"), (1_048_524, "1023.9 KiB"), (1_048_575, "1.0 MiB"),
                                     (274_827_674, "262.1 MiB"), (16 << 20, "16.0 MiB"),
                                     (2 << 30, "2.0 GiB"), (3 << 40, "3.0 TiB"), (5000 << 40, "5000.0 TiB")])
def test_human_size_counts_binary_units(n, text):
    """Sizes print in the binary units the options take (16MiB), with a decimal below 1 MiB: a small
    checkpoint was "0.0 MB" in decimal MB. A figure rounding to 1024.0 of a unit shows in the next unit."""
    from cloudckpt.errors import human_size

    assert human_size(n) == text
