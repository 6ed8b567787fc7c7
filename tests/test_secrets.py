"""Issue 12, "Secrets": a credential in a checkpoint URL never reaches any output.

Each form (userinfo on memory:// and s3://, sftp:// that cannot connect, signed
query strings) is driven as a user would: real training through
cloudckpt.CheckpointSaverHook, the library API and the CLI. The secret must be
absent from DEBUG logs of every logger, exception text and traceback, CLI
stdout/stderr (also --json and --debug), manifests, state files and local files.
"""

from __future__ import annotations

import json
import logging
import os
import traceback
import uuid
from pathlib import Path

import fsspec
import pytest
from fsspec.implementations.memory import MemoryFileSystem

import cloudckpt
from cloudckpt import cli
from cloudckpt.embedded import free_port
from cloudckpt.errors import RedactedError
from cloudckpt.remote import RemoteStore
from cloudckpt.urls import display_url, is_local_path, option_secrets, parse_url, redact, sanitized_cause
from support.tf_model import train
from test_cli import run_cli_many


def assert_secret_free(secret: str, *texts: str | bytes) -> None:
    for text in texts:
        data = text if isinstance(text, bytes) else text.encode("utf-8", "surrogateescape")
        assert secret.encode() not in data, text


def full_traceback(exc: BaseException) -> str:
    return "".join(traceback.format_exception(exc))


def local_files_secret_free(secret: str, *roots: str | Path) -> int:
    """Names and contents of every file under ``roots`` are free of ``secret``; returns how many were read."""
    count = 0
    for root in roots:
        for directory, dirs, files in os.walk(root):
            for name in [*dirs, *files]:
                assert secret not in name, os.path.join(directory, name)
            for name in files:
                with open(os.path.join(directory, name), "rb") as f:
                    assert secret.encode() not in f.read(), os.path.join(directory, name)
                count += 1
    return count


# -- the display form --------------------------------------------------------------------------------

@pytest.mark.parametrize("url, shown", [
    ("memory://user:pw@host/run", "memory://***@host/run"),
    ("sftp://user:p@ss?w#rd@127.0.0.1:22/run", "sftp://***@127.0.0.1:22/run"),
    ("https://TOKEN@example.com/x", "https://***@example.com/x"),
    ("s3://bucket/run?X-Amz-Credential=AK%2F1&X-Amz-Signature=abc",
     "s3://bucket/run?X-Amz-Credential=***&X-Amz-Signature=***"),
    ("az://c/run?sv=2022&sig=abc", "az://c/run?sv=***&sig=***"),
    ("s3://bucket/team@example.com/run", "s3://bucket/team@example.com/run"),  # '@' in a key is no userinfo
    ("s3://bucket/a::b", "s3://bucket/a::b"),
    ("runs/user:pw@host?token=x", "runs/user:pw@host?token=x"),  # a local path is shown as given
    # an AWS secret key pasted raw, "/" and all (RFC 3986 wants %2F; users paste what the console shows)
    ("s3://AKIAIOSFODNN7EXAMPLE:wJalrXUtnFEMI/K7MDENG+bPxRfiCYEXAMPLEKEY@bucket/run", "s3://***@bucket/run"),
    ("s3://bucket/a:b@c/run", "s3://bucket/a:b@c/run"),  # no user name holds "/": a key
    ("sftp://host:22/path@x/y", "sftp://host:22/path@x/y"),  # host:port, then a path
])
def test_display_form(url, shown):
    assert display_url(url) == shown
    assert display_url(shown) == shown  # idempotent


def test_userinfo_is_percent_decoded_and_every_spelling_is_a_secret():
    from cloudckpt.urls import parse_url

    parsed = parse_url("s3://AKID:wJal%2FK7%40x@bucket/run")
    assert (parsed.username, parsed.password) == ("AKID", "wJal/K7@x")
    assert {"wJal/K7@x", "wJal%2FK7%40x"} <= set(parsed.secrets)
    slashed = parse_url("s3://AKID:wJal/K7MDENG@bucket/run")
    assert (slashed.password, slashed.location) == ("wJal/K7MDENG", "bucket/run")


def test_redact_free_text_and_literal_secrets():
    text = ('botocore: Invalid bucket name "u:hunter22@b": https://h/x?access_token=ya29.T&y=1 and token=abc '
            "memory://u:hunter22@b/run")
    cleaned = redact(text, secrets=parse_url("memory://u:hunter22@b/run").secrets)
    assert "hunter22" not in cleaned and "ya29.T" not in cleaned and "token=abc" not in cleaned
    assert "memory://***@b/run" in cleaned and "access_token=***" in cleaned


def test_sanitized_cause_replaces_only_leaking_links():
    secret = f"pw-{uuid.uuid4().hex[:10]}"  # made at run time: traceback source lines must not hold it
    clean = ValueError("nothing secret here")
    assert sanitized_cause(clean, (secret,)) is clean
    try:
        try:
            raise OSError(f"low-level: password={secret}")
        except OSError as inner:
            raise PermissionError(f"denied for u:{secret}") from inner
    except PermissionError as exc:
        leaking = exc
    stand_in = sanitized_cause(leaking, (secret,))
    assert isinstance(stand_in, RedactedError) and stand_in.original_type == "PermissionError"
    assert isinstance(stand_in.__cause__, RedactedError) and stand_in.__cause__.original_type == "OSError"
    text = full_traceback(stand_in)
    assert secret not in text and "PermissionError: denied for u:***" in text
    assert "raise PermissionError" in text  # the original traceback (code locations) is kept


def test_reprs_of_parsed_urls_and_signing_credentials_hold_no_secret():
    from cloudckpt.s3_transport import _Credentials

    parsed = parse_url("s3://AKIDREPR:pw-repr-DO-NOT-LEAK@bucket/run")
    assert repr(parsed) == "CheckpointUrl('s3://***@bucket/run')"
    shown = repr(_Credentials("AKIDREPR", "pw-repr-DO-NOT-LEAK", "TOKEN-repr-DO-NOT-LEAK"))
    assert "DO-NOT-LEAK" not in shown and "AKIDREPR" not in shown


def test_credential_storage_options_are_scrubbed_too():
    options = {"key": "AKIAEXAMPLEKEYID", "secret": "wJalrXUtnFEMI/K7MDENG", "endpoint_url": "http://127.0.0.1:9",
               "client_kwargs": {"aws_session_token": "FwoGZXIvYXdzEXAMPLE"}, "sas_token": "short"}
    assert option_secrets(options) == ("wJalrXUtnFEMI/K7MDENG", "FwoGZXIvYXdzEXAMPLE")


def test_logging_backstop_on_the_cloudckpt_logger(caplog):
    caplog.set_level(logging.DEBUG)
    logging.getLogger("cloudckpt").warning("slipped through: %s", "s3://AKID:hunter22@b/k?X-Amz-Signature=zz9")
    assert "hunter22" not in caplog.text and "zz9" not in caplog.text
    assert "s3://***@b/k?X-Amz-Signature=***" in caplog.text



# -- request URLs quoted by backends: harmless query values shown, credentials masked ------------------

def test_request_url_keeps_harmless_query_values_and_masks_credentials():
    secret = f"SIG{uuid.uuid4().hex}"
    url = ("https://bucket.s3.amazonaws.com/ckpt?list-type=2&prefix=runs%2Fexp1%2F&delimiter=%2F&max-keys=1000"
           "&start-after=runs%2Fa&encoding-type=url&continuation-token=1ueGcxLPRx1Tr%2FXYExHnhbYLgveDs2J"
           f"&X-Amz-Algorithm=AWS4-HMAC-SHA256&X-Amz-Credential=AKIA%2F20260101&X-Amz-Security-Token={secret}"
           f"&X-Amz-Signature={secret}&partNumber=3&uploadId=VXBsb2FkIElE&token={secret}&sig={secret}"
           f"&unknown-param={secret}")
    shown = display_url(url)
    assert shown == ("https://bucket.s3.amazonaws.com/ckpt?list-type=2&prefix=runs%2Fexp1%2F&delimiter=%2F"
                     "&max-keys=1000&start-after=runs%2Fa&encoding-type=url&continuation-token=***"
                     "&X-Amz-Algorithm=***&X-Amz-Credential=***&X-Amz-Security-Token=***&X-Amz-Signature=***"
                     "&partNumber=3&uploadId=VXBsb2FkIElE&token=***&sig=***&unknown-param=***")
    assert display_url(shown) == shown  # idempotent
    gcs = (f"https://storage.googleapis.com/storage/v1/b/bkt/o?prefix=run%2F&delimiter=%2F&maxResults=500"
           f"&alt=json&uploadType=resumable&name=run%2Fmanifest.json&access_token={secret}&key={secret}"
           f"&GoogleAccessId=sa%40p.iam&Signature={secret}")
    assert display_url(gcs) == ("https://storage.googleapis.com/storage/v1/b/bkt/o?prefix=run%2F&delimiter=%2F"
                                "&maxResults=500&alt=json&uploadType=resumable&name=run%2Fmanifest.json"
                                "&access_token=***&key=***&GoogleAccessId=***&Signature=***")
    # free text as botocore/s3fs quote it, and the exception chain standing in for it
    text = f'Could not connect to the endpoint URL: "{url}"'
    cleaned = redact(text)
    assert secret not in cleaned and "AKIA" not in cleaned and "1ueGcxLPRx1Tr" not in cleaned
    assert "/ckpt?list-type=2&prefix=runs%2Fexp1%2F&delimiter=%2F&max-keys=1000" in cleaned
    stand_in = sanitized_cause(OSError(text))
    assert isinstance(stand_in, RedactedError) and "prefix=runs%2Fexp1%2F" in str(stand_in)
    assert secret not in str(stand_in)
    # a harmless-only request URL is no leak: the original exception is kept as it is
    harmless = OSError('Could not connect to the endpoint URL: "http://127.0.0.1:9/b?list-type=2&prefix=run%2F"')
    assert sanitized_cause(harmless) is harmless
    # a checkpoint URL's harmless query values are not literal secrets either (they would mangle messages)
    assert parse_url(f"s3://b/run?prefix=run&X-Amz-Signature={secret}").secrets == (secret,)


def test_real_botocore_error_names_the_listed_prefix():
    """botocore's own error for a list request to a closed port: the prefix stays readable once redacted."""
    import botocore.config
    import botocore.exceptions
    import botocore.session

    client = botocore.session.get_session().create_client(
        "s3", endpoint_url=f"http://127.0.0.1:{free_port()}", region_name="us-east-1",
        aws_access_key_id="AKIDCLOSED", aws_secret_access_key="secret-closed-port",
        config=botocore.config.Config(retries={"max_attempts": 0}, connect_timeout=2))
    with pytest.raises(botocore.exceptions.EndpointConnectionError) as info:
        client.list_objects_v2(Bucket="bkt", Prefix="runs/exp1/", Delimiter="/")
    cleaned = redact(str(info.value))
    assert "prefix=runs%2Fexp1%2F" in cleaned and "delimiter=%2F" in cleaned and "list-type=2" in cleaned, cleaned
    assert sanitized_cause(info.value) is info.value

# -- userinfo on memory:// : a full run, library API and CLI ------------------------------------------

def test_memory_url_with_password_full_run(tmp_path, caplog, capsys):
    caplog.set_level(logging.DEBUG)  # the root logger: cloudckpt, fsspec, TF... everything
    secret = f"pw-{uuid.uuid4().hex[:10]}"
    host = f"host-{uuid.uuid4().hex[:8]}"
    url = f"memory://user:{secret}@{host}/run"
    shown = f"memory://***@{host}/run"
    hooks = []

    def make_hook(scaffold):
        hooks.append(cloudckpt.CheckpointSaverHook(url, save_steps=2, scaffold=scaffold,
                                                   local_dir=str(tmp_path / "local")))
        return hooks[-1]

    train(make_hook, last_step=3)
    hook = hooks[0]
    assert hook.checkpoint_url == shown
    infos = cloudckpt.list_checkpoints(url)
    assert [c.step for c in infos] == [0, 2, 3]
    assert infos[-1].prefix == f"{shown}/model.ckpt-3"
    assert infos[-1].manifest_url == f"{shown}/model.ckpt-3.manifest.json"
    report = cloudckpt.verify(url)
    assert report.ok and report.url == f"{shown}/model.ckpt-3"
    restored = cloudckpt.download_checkpoint(url, str(tmp_path / "restored"), step=2)
    assert restored == str(tmp_path / "restored" / "model.ckpt-2")

    # The userinfo is a credential, not part of the location: the store's keys hold no secret.
    fs = fsspec.filesystem("memory")
    keys = [k for k in MemoryFileSystem.store if host in k]
    assert f"/{host}/run/model.ckpt-3.manifest.json" in keys and f"/{host}/run/checkpoint" in keys
    for key in keys:
        assert_secret_free(secret, key, fs.cat_file(key))

    # The CLI, in-process (memory:// lives in this process).
    capsys.readouterr()
    assert cli.main(["ls", "--json", url]) == 0
    as_json = capsys.readouterr()
    assert_secret_free(secret, as_json.out, as_json.err)
    assert [r["prefix"] for r in json.loads(as_json.out)] == [f"{shown}/model.ckpt-{s}" for s in (0, 2, 3)]
    assert cli.main(["ls", url]) == 0
    assert cli.main(["verify", url, "--all"]) == 0
    assert cli.main(["pull", url, str(tmp_path / "pulled")]) == 0
    assert cli.main(["push", str(tmp_path / "pulled"), f"memory://user:{secret}@{host}/copy"]) == 0
    assert cli.main(["gc", url, "--keep", "2"]) == 0
    assert cli.main(["verify", url, "--step", "99"]) == 1  # an error line names the URL
    out, err = capsys.readouterr()
    assert_secret_free(secret, out, err)
    assert f"3 of 3 checkpoint(s) in {shown} verified OK" in out
    assert f"Pushed 1 checkpoint(s) to memory://***@{host}/copy" in out
    assert f"No committed checkpoint at step 99 in {shown}" in err
    assert [c.step for c in cloudckpt.list_checkpoints(url)] == [2, 3]

    assert_secret_free(secret, caplog.text, repr(infos), repr(hook.stats()), repr(report))
    assert any(shown in r.getMessage() for r in caplog.records if r.name == "cloudckpt")  # the commit lines
    assert local_files_secret_free(secret, tmp_path, os.environ["CLOUDCKPT_CACHE_DIR"]) > 10


class _LeakyFileSystem(MemoryFileSystem):
    """A backend whose errors echo the credentials and URL it was given, as some client libraries do."""

    protocol = "leakyfs"

    def __init__(self, *args, username=None, password=None, token=None, **kwargs):
        super().__init__(*args, **kwargs)
        self.userinfo = f"{username}:{password}"
        self.token = token

    @classmethod
    def _strip_protocol(cls, path):
        return super()._strip_protocol(path.replace("leakyfs://", "memory://", 1))

    def put_file(self, lpath, rpath, *args, **kwargs):
        try:
            raise OSError(f"handshake failed; password {self.userinfo.split(':')[1]}, bearer {self.token}")
        except OSError as low_level:
            raise PermissionError(f"Access denied for {self.userinfo} at leakyfs://{self.userinfo}@{rpath}") \
                from low_level


fsspec.register_implementation("leakyfs", _LeakyFileSystem, clobber=True)


def test_backend_error_echoing_the_credentials(tmp_path, caplog):
    caplog.set_level(logging.DEBUG)
    secret, token = f"pw-{uuid.uuid4().hex[:10]}", f"tok-{uuid.uuid4().hex}"
    url = f"leakyfs://user:{secret}@host-{uuid.uuid4().hex[:6]}/run"
    hooks = []

    def make_hook(scaffold):
        hooks.append(cloudckpt.CheckpointSaverHook(url, save_steps=2, local_dir=str(tmp_path / "local"),
                                                   storage_options={"token": token}))
        return hooks[-1]

    with pytest.raises(cloudckpt.UploadError) as info:
        train(make_hook, last_step=3)
    error = info.value
    text = full_traceback(error)
    assert_secret_free(secret, str(error), text, caplog.text, error.url)
    assert_secret_free(token, str(error), text, caplog.text)
    assert "bearer ***" in text  # the storage option echoed in the innermost cause
    assert "leakyfs://***@host-" in str(error) and "PermissionError" in str(error)
    assert "RedactedError: PermissionError: Access denied for ***" in text  # the cause, redacted, kept
    causes = hooks[0].stats().failures_by_cause  # how many saves failed before training saw one depends on timing
    assert set(causes) == {"PermissionError"} and causes["PermissionError"] >= 1


# -- userinfo on s3:// (s3fs takes it as key/secret): a full run and the CLI as a subprocess ----------

def test_s3_url_with_credentials_full_run_and_cli(moto_server, tmp_path, caplog):
    caplog.set_level(logging.DEBUG)
    secret = f"Sk{uuid.uuid4().hex}"
    bucket = f"ckpt-{uuid.uuid4().hex[:12]}"
    moto_server.create_bucket(bucket)
    url = f"s3://AKIDUSERINFO:{secret}@{bucket}/run"
    shown = f"s3://***@{bucket}/run"
    endpoint = {"endpoint_url": moto_server.endpoint}
    hooks = []

    def make_hook(scaffold):
        hooks.append(cloudckpt.CheckpointSaverHook(url, save_steps=2, local_dir=str(tmp_path / "local"),
                                                   storage_options=endpoint))
        return hooks[-1]

    train(make_hook, last_step=3)
    assert hooks[0].checkpoint_url == shown
    assert [c.prefix for c in cloudckpt.list_checkpoints(url, endpoint)][-1] == f"{shown}/model.ckpt-3"
    client = moto_server.client()
    objects = client.list_objects_v2(Bucket=bucket)["Contents"]
    assert "run/model.ckpt-3.manifest.json" in {o["Key"] for o in objects}
    for o in objects:
        assert_secret_free(secret, o["Key"], client.get_object(Bucket=bucket, Key=o["Key"])["Body"].read())
    assert_secret_free(secret, caplog.text)

    option = ["-o", f"endpoint_url={moto_server.endpoint}"]
    missing = f"s3://AKIDUSERINFO:{secret}@no-such-bucket-{uuid.uuid4().hex[:8]}/run"
    ls, ls_json, verify, pull, push, gc, absent, absent_debug, both_keys = run_cli_many(
        ["ls", url, *option], ["ls", "--json", url, *option], ["verify", url, "--all", *option, "--debug"],
        ["pull", url, str(tmp_path / "pulled"), *option], ["push", str(tmp_path / "local"), url + "2", *option],
        ["gc", url, "--keep", "1", "--dry-run", *option], ["ls", missing, *option], ["ls", missing, *option, "--debug"],
        ["ls", url, *option, "-o", "key=AKIDOTHER"])
    for proc in (ls, ls_json, verify, pull, push, gc, absent, absent_debug, both_keys):
        assert_secret_free(secret, proc.stdout, proc.stderr)
    assert ls.returncode == verify.returncode == pull.returncode == push.returncode == gc.returncode == 0, \
        [p.stderr for p in (ls, verify, pull, push, gc)]
    assert [r["prefix"] for r in json.loads(ls_json.stdout)] == [f"{shown}/model.ckpt-{s}" for s in (0, 2, 3)]
    assert f"3 of 3 checkpoint(s) in {shown} verified OK" in verify.stdout
    assert f"in {shown}" in gc.stdout and f"to {shown}2" in push.stdout
    assert absent.returncode == 2 and "does not exist" in absent.stderr and "s3://***@no-such-bucket-" in absent.stderr
    assert absent_debug.returncode != 0 and "Traceback" in absent_debug.stderr
    assert both_keys.returncode == 2 and "Invalid storage_options or URL credentials" in both_keys.stderr
    assert local_files_secret_free(secret, tmp_path, os.environ["CLOUDCKPT_CACHE_DIR"]) > 10


def test_s3_credentials_in_url_rejected_by_the_store(tmp_path):
    from cloudckpt.embedded import EmbeddedS3
    from test_errors import set_moto_auth

    secret = f"Sk{uuid.uuid4().hex}"
    with EmbeddedS3() as server:
        bucket = f"ckpt-{uuid.uuid4().hex[:8]}"
        server.create_bucket(bucket)
        url = f"s3://AKIAWRONGWRONGWRONG1:{secret}@{bucket}/run"
        set_moto_auth(server.endpoint, "0")
        try:
            with pytest.raises(cloudckpt.RemoteError) as info:
                train(lambda s: cloudckpt.CheckpointSaverHook(
                    url, save_steps=5, local_dir=str(tmp_path / "local"),
                    storage_options={"endpoint_url": server.endpoint}), last_step=5)
        finally:
            set_moto_auth(server.endpoint, "inf")
    assert_secret_free(secret, str(info.value), full_traceback(info.value))
    assert f"s3://***@{bucket}/run" in str(info.value) and "rejected the credentials" in str(info.value)


# -- sftp:// with a password, nothing listening (or no paramiko) ---------------------------------------

def test_sftp_url_with_password_fails_clearly(tmp_path):
    secret = f"pw-{uuid.uuid4().hex[:10]}"
    port = free_port()  # nothing listens there
    url = f"sftp://user:{secret}@127.0.0.1:{port}/run"
    shown = f"sftp://***@127.0.0.1:{port}/run"
    with pytest.raises(cloudckpt.CloudCkptError) as info:
        cloudckpt.CheckpointSaverHook(url, save_steps=2, local_dir=str(tmp_path / "local"))
    message = str(info.value)
    assert_secret_free(secret, message, full_traceback(info.value))
    assert shown in message
    try:
        import paramiko  # noqa: F401
    except ImportError:
        assert isinstance(info.value, cloudckpt.ConfigError) and "pip install paramiko" in message
    else:
        assert isinstance(info.value, cloudckpt.RemoteError) and message.startswith(f"connect to {shown} failed")

    plain, debug = run_cli_many(["ls", url], ["ls", url, "--debug"])
    assert plain.returncode in (1, 2) and shown in plain.stderr and "Traceback" not in plain.stderr
    assert debug.returncode != 0 and "Traceback" in debug.stderr
    assert_secret_free(secret, plain.stdout, plain.stderr, debug.stdout, debug.stderr)


# -- signed query strings ------------------------------------------------------------------------------

SIGNED = [
    "s3://bucket/run?X-Amz-Algorithm=AWS4-HMAC-SHA256&X-Amz-Credential=AKIA%2F20260101&X-Amz-Security-Token={s}"
    "&X-Amz-Signature={s}",
    "gs://bucket/run?X-Goog-Credential=sa%40p.iam&X-Goog-Signature={s}",
    "az://container/run?sv=2022-11-02&ss=b&sig={s}",
    "memory://host/run?access_token={s}",
]


@pytest.mark.parametrize("template", SIGNED, ids=["s3-presigned", "gcs-signed", "azure-sas", "token"])
def test_signed_query_string_is_a_clear_config_error(template, tmp_path):
    secret = f"SIG{uuid.uuid4().hex}"
    url = template.format(s=secret)
    with pytest.raises(cloudckpt.ConfigError) as info:
        RemoteStore(url)
    message = str(info.value)
    assert "has a query string" in message and "storage_options" in message
    assert display_url(url) in message and "=***" in message
    assert_secret_free(secret, message, full_traceback(info.value))
    with pytest.raises(cloudckpt.ConfigError) as info:
        cloudckpt.CheckpointSaverHook(url, save_steps=2, local_dir=str(tmp_path / "local"))
    assert_secret_free(secret, str(info.value), full_traceback(info.value))
    assert not is_local_path(url)


def test_signed_query_string_on_the_cli():
    secret = f"SIG{uuid.uuid4().hex}"
    url = SIGNED[0].format(s=secret)
    plain, as_json, debug = run_cli_many(["ls", url], ["ls", "--json", url], ["verify", url, "--debug"])
    for proc in (plain, as_json, debug):
        assert proc.returncode != 0
        assert_secret_free(secret, proc.stdout, proc.stderr)
    assert plain.returncode == 2 and "has a query string" in plain.stderr and "X-Amz-Signature=***" in plain.stderr
    assert "Traceback" in debug.stderr and "ConfigError" in debug.stderr


# -- an S3 endpoint_url with userinfo: refused before any request -----------------------------------------------

@pytest.mark.parametrize("options", [
    {"endpoint_url": "http://AKIDEP:pw-endpoint-DO-NOT-LEAK@127.0.0.1:{port}"},
    {"client_kwargs": {"endpoint_url": "http://AKIDEP:pw-endpoint-DO-NOT-LEAK@127.0.0.1:{port}"}},
])
def test_s3_endpoint_url_with_credentials_is_refused_before_any_request(options, tmp_path):
    """Before: s3fs failed after its retries ("Cannot combine AUTHORIZATION header..."), and cloudckpt's
    transport took "user:password@127.0.0.1" for the host: the password went to the resolver (a DNS lookup),
    into the Host header and into repr(S3Transport). Now a ConfigError, naming endpoint_url in display form."""
    import socket

    from cloudckpt.s3_transport import transport_for

    with socket.socket() as listener:  # a server that would see any request
        listener.bind(("127.0.0.1", 0))
        listener.listen()
        listener.settimeout(0.2)
        port = listener.getsockname()[1]
        options = json.loads(json.dumps(options).replace("{port}", str(port)))
        secret = "pw-endpoint-DO-NOT-LEAK"
        with pytest.raises(cloudckpt.ConfigError) as info:
            RemoteStore("s3://bucket/run", {**options, "key": "AKIDEP", "secret": "s3-secret-value"})
        with pytest.raises(cloudckpt.ConfigError) as listing:
            cloudckpt.list_checkpoints("s3://bucket/run", options)
        with pytest.raises(cloudckpt.ConfigError) as transport:
            transport_for({**options, "key": "AKIDEP", "secret": "s3-secret-value"})
        with pytest.raises(socket.timeout):
            listener.accept()
    for error in (info.value, listing.value, transport.value):
        assert_secret_free(secret, str(error), full_traceback(error))
        assert "endpoint_url" in str(error) and "key/secret" in str(error)
    assert f"'http://***@127.0.0.1:{port}' for 's3://bucket/run'" in str(info.value)
