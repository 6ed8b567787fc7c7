"""The ``cloudckpt`` command line, run as a subprocess against the moto S3 server (issue 6).

Checkpoints come from one training run with TF's *stock* CheckpointSaverHook
(module fixture); most tests commit them to a fresh bucket in-process and then
drive the CLI. Facts are checked independently: objects via boto3, integrity
via support.checks, restores via tf.train.
"""

from __future__ import annotations

import argparse
import fcntl
import json
import os
import pty
import re
import signal
import struct
import subprocess
import sys
import termios
import threading
import uuid
from pathlib import Path

import numpy as np
import pytest

from cloudckpt import cli
from cloudckpt.commit import commit_checkpoint, find_local_checkpoint
from cloudckpt.errors import ConfigError, human_size
from cloudckpt.remote import RemoteStore
from support.checks import assert_all_committed_intact, log_entries, manifests, state_file

STEPS = [0, 10, 20, 30]
ISO_UTC = re.compile(r"^\d{4}-\d{2}-\d{2}T\d{2}:\d{2}:\d{2}Z$")
SUBCOMMANDS = ["ls", "verify", "pull", "push", "rollback", "gc", "demo"]


def cli_env() -> dict[str, str]:
    env = dict(os.environ)
    env.update(AWS_ACCESS_KEY_ID="testing", AWS_SECRET_ACCESS_KEY="testing", AWS_DEFAULT_REGION="us-east-1",
               TF_CPP_MIN_LOG_LEVEL="2")
    env.pop("AWS_PROFILE", None)
    env.pop("AWS_ENDPOINT_URL", None)
    return env


def run_cli(*args: str, timeout: float = 120) -> subprocess.CompletedProcess:
    """``python -m cloudckpt.cli ARGS`` with stdout/stderr captured (so stderr is not a TTY)."""
    return subprocess.run([sys.executable, "-m", "cloudckpt.cli", *args], env=cli_env(), capture_output=True,
                          text=True, timeout=timeout, stdin=subprocess.DEVNULL)


def run_cli_many(*commands: list[str], timeout: float = 120) -> list[subprocess.CompletedProcess]:
    """Run independent CLI invocations concurrently (subprocess start-up dominates these tests)."""
    procs = [subprocess.Popen([sys.executable, "-m", "cloudckpt.cli", *args], env=cli_env(), stdout=subprocess.PIPE,
                              stderr=subprocess.PIPE, stdin=subprocess.DEVNULL, text=True) for args in commands]
    results = []
    for args, proc in zip(commands, procs):
        try:
            out, err = proc.communicate(timeout=timeout)
        except subprocess.TimeoutExpired:
            for p in procs:
                p.kill()
            raise
        results.append(subprocess.CompletedProcess(proc.args, proc.returncode, out, err))
    return results


def run_cli_tty(*args: str, timeout: float = 120) -> tuple[int, str, str]:
    """Like run_cli, but stderr is a pseudo-terminal (100 columns): (returncode, stdout, stderr bytes as text)."""
    master, slave = pty.openpty()
    fcntl.ioctl(slave, termios.TIOCSWINSZ, struct.pack("HHHH", 24, 100, 0, 0))
    try:
        proc = subprocess.run([sys.executable, "-m", "cloudckpt.cli", *args], env=cli_env(), stdout=subprocess.PIPE,
                              stderr=slave, stdin=subprocess.DEVNULL, timeout=timeout)
    finally:
        os.close(slave)
    chunks = []
    while True:
        try:
            data = os.read(master, 65536)
        except OSError:  # EIO: the slave side is closed and drained
            break
        if not data:
            break
        chunks.append(data)
    os.close(master)
    return proc.returncode, proc.stdout.decode(), b"".join(chunks).decode(errors="replace")


def one_error_line(stderr: str) -> str:
    """stderr must be exactly one line, no traceback; returns it."""
    lines = [line for line in stderr.splitlines() if line.strip()]
    assert len(lines) == 1, stderr
    assert "Traceback" not in stderr
    assert lines[0].startswith("cloudckpt"), lines[0]
    return lines[0]


# -- fixtures ---------------------------------------------------------------------------------------

@pytest.fixture(scope="module", autouse=True)
def demo_run(tmp_path_factory):
    """``cloudckpt demo`` started in the background at the start of the module (it imports TF and trains,
    the slowest subcommand); test_demo collects it at the end."""
    out = tmp_path_factory.mktemp("demo") / "out.txt"
    with open(out, "w") as sink:
        proc = subprocess.Popen([sys.executable, "-m", "cloudckpt.cli", "demo", "--steps", "6", "--save-steps", "3"],
                                env=cli_env(), stdout=sink, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL)
    yield proc, out
    if proc.poll() is None:
        proc.kill()
        proc.wait()


@pytest.fixture(scope="module")
def stock_dir(tmp_path_factory) -> Path:
    """A checkpoint directory written by TF's own CheckpointSaverHook (steps 0, 10, 20, 30 + graph.pbtxt)."""
    import tensorflow as tf

    from support.tf_model import train

    directory = tmp_path_factory.mktemp("stock")
    train(lambda s: tf.compat.v1.train.CheckpointSaverHook(str(directory), save_steps=10), last_step=30)
    assert sorted(int(p.name.split("-")[1].split(".")[0]) for p in directory.glob("model.ckpt-*.index")) == STEPS
    assert (directory / "graph.pbtxt").is_file()
    return directory


@pytest.fixture
def bucket(moto_server):
    """(url, bucket name, boto3 client, endpoint option) for a fresh bucket."""
    name = f"ckpt-{uuid.uuid4().hex[:12]}"
    moto_server.create_bucket(name)
    return f"s3://{name}/runs/exp1", name, moto_server.client(), f"endpoint_url={moto_server.endpoint}"


@pytest.fixture
def committed(bucket, stock_dir, moto_server):
    """``bucket`` with every stock checkpoint committed (in-process, to keep the CLI tests about the CLI)."""
    url = bucket[0]
    store = RemoteStore(url, moto_server.storage_options)
    for step in STEPS:
        commit_checkpoint(store, find_local_checkpoint(str(stock_dir), f"model.ckpt-{step}"))
    return bucket


def keys(client, name: str) -> list[str]:
    """Objects of the run directory, without its commit log (``.cloudckpt/log/``)."""
    found = (o["Key"].split("/", 2)[-1] for o in client.list_objects_v2(Bucket=name).get("Contents", []))
    return sorted(k for k in found if not k.startswith(".cloudckpt/"))


def add_incomplete(client, name: str, step: int, source_step: int = 30) -> None:
    """Files of an upload cut short: ``model.ckpt-<step>.*`` without a manifest."""
    for suffix in (".index", ".data-00000-of-00001"):
        client.copy_object(Bucket=name, Key=f"runs/exp1/model.ckpt-{step}{suffix}",
                           CopySource={"Bucket": name, "Key": f"runs/exp1/model.ckpt-{source_step}{suffix}"})


def flip_byte(client, name: str, key: str) -> None:
    body = bytearray(client.get_object(Bucket=name, Key=key)["Body"].read())
    body[len(body) // 2] ^= 0xFF
    client.put_object(Bucket=name, Key=key, Body=bytes(body))


# -- help -------------------------------------------------------------------------------------------

def test_help_describes_every_option():
    parser = cli.build_parser()
    subparsers = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
    assert sorted(subparsers.choices) == sorted(SUBCOMMANDS)
    parsers = [(None, parser), *subparsers.choices.items()]
    helps = run_cli_many(*[[*([command] if command else []), "--help"] for command, _ in parsers])
    for (command, sub), proc in zip(parsers, helps):
        assert proc.returncode == 0, proc.stderr
        text = " ".join(proc.stdout.split())
        for action in sub._actions:
            if isinstance(action, argparse._SubParsersAction):
                for choice in action.choices:
                    assert re.search(rf"\b{choice}\b", text), (command, choice)
                continue
            assert action.help and action.help != argparse.SUPPRESS, (command, action.dest)
            names = action.option_strings or [action.metavar]
            for name in names:
                assert name in text, (command, name)
            assert " ".join(action.help.split())[:40] in text, (command, action.dest)
        if command not in (None, "demo"):
            assert "--storage-option" in text and "exit codes" in text



def test_help_lists_every_exit_code():
    """`--help` listed only 0/1/2 while the command also exits 130 (Ctrl-C), 141 (reader gone) and 143
    (SIGTERM), as README says: every EXIT_* code of cli is in EXIT_CODES, and --help (the top level and a
    subcommand) and README's CLI section list each of them."""
    codes = {value for name, value in vars(cli).items() if name.startswith("EXIT_") and isinstance(value, int)}
    assert codes == {code for code, _ in cli.EXIT_CODES} == {0, 1, 2, 130, 141, 143}
    for proc in run_cli_many(["--help"], ["verify", "--help"]):
        assert proc.returncode == 0, proc.stderr
        section = proc.stdout[proc.stdout.index("exit codes:"):]
        listed = [int(m) for m in re.findall(r"^  (\d+) ", section, re.MULTILINE)]
        assert listed == [code for code, _ in cli.EXIT_CODES], section
        assert "interrupted (Ctrl-C)" in section and "terminated (SIGTERM" in section, section
    readme = " ".join((Path(cli.__file__).parent.parent / "README.md").read_text().split())
    sentence = readme[readme.index("Exit codes: 0 ok"):][:400]
    for code, _ in cli.EXIT_CODES:
        assert re.search(rf"\b{code} ", sentence), (code, sentence)


def test_storage_option_parsing():
    parse = cli.storage_option
    pairs = [parse(t) for t in ("endpoint_url=http://h:9000", "anon=false", "use_ssl=TRUE", "n=3", "x=1.5",
                                "token=null", 'code="0123"', "client_kwargs.region_name=us-east-1",
                                "config_kwargs.retries={\"max_attempts\": 2}", "empty=", "eq=a=b")]
    assert cli.build_storage_options(pairs) == {
        "endpoint_url": "http://h:9000", "anon": False, "use_ssl": True, "n": 3, "x": 1.5, "token": None,
        "code": "0123", "client_kwargs": {"region_name": "us-east-1"},
        "config_kwargs": {"retries": {"max_attempts": 2}}, "empty": "", "eq": "a=b"}
    for bad in ("novalue", "=x", "a..b=1", "j={not json"):
        with pytest.raises(argparse.ArgumentTypeError) as info:
            parse(bad)
        assert "not json" not in str(info.value)
    with pytest.raises(ConfigError, match="client_kwargs"):
        cli.build_storage_options([parse("client_kwargs=s3cr3t"), parse("client_kwargs.region_name=x")])


# -- push -------------------------------------------------------------------------------------------

def test_push_stock_tf_directory_then_ls_verify_pull(bucket, stock_dir, moto_server, tmp_path):
    import tensorflow as tf

    url, name, client, endpoint = bucket
    proc = run_cli("push", str(stock_dir), url, "--storage-option", endpoint)
    assert proc.returncode == 0, proc.stderr
    assert proc.stderr == ""
    lines = proc.stdout.splitlines()
    assert [line.split(":")[0] for line in lines[:4]] == [f"step {s}" for s in STEPS]
    assert all("committed model.ckpt-" in line for line in lines[:4])

    expected = {f"model.ckpt-{s}{x}" for s in STEPS for x in (".index", ".data-00000-of-00001", ".meta",
                                                                ".manifest.json")}
    assert set(keys(client, name)) == expected | {"graph.pbtxt", "checkpoint"}
    assert [e["type"] for e in log_entries(url, moto_server.storage_options)] == ["writer"] + ["commit"] * 4
    assert sorted(assert_all_committed_intact(url, moto_server.storage_options)) == STEPS
    assert state_file(url, moto_server.storage_options)["model_checkpoint_path"] == ["model.ckpt-30"]
    graph = client.get_object(Bucket=name, Key="runs/exp1/graph.pbtxt")["Body"].read()
    assert graph == (stock_dir / "graph.pbtxt").read_bytes()

    target = tmp_path / "restored"
    listing, check, pull = run_cli_many(["ls", url, "--json", "-o", endpoint], ["verify", url, "--all", "-o", endpoint],
                                        ["pull", url, str(target), "-o", endpoint])
    assert listing.returncode == 0, listing.stderr
    rows = json.loads(listing.stdout)
    assert [(r["step"], r["status"], r["files"]) for r in rows] == [(s, "committed", 3) for s in STEPS]
    for r in rows:
        local = sum(p.stat().st_size for p in stock_dir.glob(f"model.ckpt-{r['step']}.*"))
        assert r["size"] == local

    assert check.returncode == 0, check.stdout + check.stderr
    assert [line.split()[:3] for line in check.stdout.splitlines()[:4]] == [["OK", "step", f"{s}:"] for s in STEPS]

    assert pull.returncode == 0, pull.stderr
    assert pull.stderr == ""  # not a TTY: no progress bar
    assert tf.train.latest_checkpoint(str(target)) == str(target / "model.ckpt-30")
    np.testing.assert_array_equal(tf.train.load_variable(str(target / "model.ckpt-30"), "w"),
                                  tf.train.load_variable(str(stock_dir / "model.ckpt-30"), "w"))
    assert not [p for p in os.listdir(target) if p.startswith(".cloudckpt-download")]

    again = run_cli("push", str(stock_dir), url, "-o", endpoint)  # idempotent: nothing re-uploaded
    assert again.returncode == 0, again.stderr
    assert again.stdout.count("already committed") == 4 and "Pushed 0 checkpoint(s)" in again.stdout
    assert manifests(url, moto_server.storage_options).keys() == set(STEPS)


def test_push_without_checkpoints_is_a_usage_error(bucket, tmp_path):
    url, name, client, endpoint = bucket
    (tmp_path / "empty").mkdir()
    (tmp_path / "empty" / "notes.txt").write_text("no checkpoints here")
    proc, missing = run_cli_many(["push", str(tmp_path / "empty"), url, "-o", endpoint],
                                 ["push", str(tmp_path / "nope"), url, "-o", endpoint])
    assert proc.returncode == 2
    assert "No TensorFlow checkpoint" in one_error_line(proc.stderr)
    assert missing.returncode == 2 and "does not exist" in one_error_line(missing.stderr)
    assert keys(client, name) == []


@pytest.fixture(scope="module")
def large_dir(tmp_path_factory) -> Path:
    """A TF checkpoint directory (a Saver's, step 1) whose data file is about 12.2 MiB: 3 parts of 5 MiB, 2 of
    8 MiB, one PUT by default (below the 200 MiB multipart threshold)."""
    import tensorflow as tf

    directory = tmp_path_factory.mktemp("large")
    with tf.Graph().as_default(), tf.compat.v1.Session() as session:
        tf.compat.v1.get_variable("big", shape=[3_200_000], initializer=tf.compat.v1.random_uniform_initializer())
        session.run(tf.compat.v1.global_variables_initializer())
        tf.compat.v1.train.Saver().save(session, str(directory / "model.ckpt"), global_step=1)
    assert (directory / LARGE_DATA).stat().st_size > 12 << 20
    return directory


LARGE_DATA = "model.ckpt-1.data-00000-of-00001"


def test_push_takes_transfer_options(bucket, large_dir, moto_server):
    """``cloudckpt push --part-size/--multipart-threshold/--files-in-flight/--parts-in-flight`` and
    ``push_checkpoints(transfer=)``, as every other entry point that moves bytes takes them: the part size shows
    in the multipart ETag's part count (``-N``) of the ~12.2 MiB data file, files in flight in the push's threads."""
    import cloudckpt

    url, name, client, endpoint = bucket
    options = moto_server.storage_options

    def parts(run: str) -> str:
        etag = client.head_object(Bucket=name, Key=f"{run}/{LARGE_DATA}")["ETag"].strip('"')
        return etag.rpartition("-")[2] if "-" in etag else "one PUT"

    proc = run_cli("push", str(large_dir), f"{url}/cli", "-o", endpoint, "--part-size", "5MiB",
                   "--multipart-threshold", "5MiB", "--files-in-flight", "2", "--parts-in-flight", "2")
    assert proc.returncode == 0, proc.stderr
    assert "step 1: committed model.ckpt-1" in proc.stdout
    assert parts("runs/exp1/cli") == "3"

    threads: list[int] = []
    result = cloudckpt.push_checkpoints(
        str(large_dir), f"{url}/lib", storage_options=options,
        transfer=cloudckpt.TransferOptions(part_size=8 << 20, multipart_threshold=5 << 20, max_files_in_flight=1),
        on_report=lambda report: threads.append(
            sum(t.name.startswith("cloudckpt-push") for t in threading.enumerate())))
    assert [(r.step, r.outcome) for r in result.reports] == [(1, "uploaded")]
    assert parts("runs/exp1/lib") == "2" and threads == [1]  # one file at a time: one pool thread

    default = cloudckpt.push_checkpoints(str(large_dir), f"{url}/default", storage_options=options,
                                         on_report=lambda report: threads.append(
                                             sum(t.name.startswith("cloudckpt-push") for t in threading.enumerate())))
    assert default.uploaded and parts("runs/exp1/default") == "one PUT" and threads[-1] > 1
    for run in ("cli", "lib", "default"):
        assert sorted(assert_all_committed_intact(f"{url}/{run}", options)) == [1]
    with pytest.raises(ConfigError, match="TransferOptions"):
        cloudckpt.push_checkpoints(str(large_dir), f"{url}/bad", storage_options=options, transfer={"part_size": 1})



def test_push_parts_in_flight_sets_the_concurrent_part_uploads(bucket, large_dir, moto_server):
    """``cloudckpt push --parts-in-flight N`` is the number of parts of one file uploading at once: through a
    proxy that holds every UploadPart 0.5 s, the ~12.2 MiB data file in 5 MiB parts (3 of them) has at most 1
    part in flight with ``--parts-in-flight 1`` and 3 with ``--parts-in-flight 3`` (the default, 4, would also
    give 3: the flag ignored fails the first run)."""
    from support.fault_proxy import FaultProxy

    url, name, client, endpoint = bucket
    most = {}
    for parts in ("1", "3"):
        with FaultProxy(moto_server.endpoint) as proxy:
            proxy.set_faults(latency=0.5, only_methods=("PUT",), path_filter=r"[?&]partNumber=")  # UploadPart
            proc = run_cli("push", str(large_dir), f"{url}/parts-{parts}", "-o", f"endpoint_url={proxy.url}",
                           "--part-size", "5MiB", "--multipart-threshold", "5MiB", "--parts-in-flight", parts)
            assert proc.returncode == 0, proc.stderr
            most[parts] = proxy.most_held.get("PUT", 0)
            uploaded = sum(1 for method, path, _ in proxy.events if method == "PUT" and "partNumber=" in path)
        assert uploaded == 3, uploaded  # 3 parts of 5 MiB: the multipart upload did go through the proxy
        assert sorted(assert_all_committed_intact(f"{url}/parts-{parts}", moto_server.storage_options)) == [1]
    assert most == {"1": 1, "3": 3}, most

@pytest.mark.parametrize("flag, value, error", [
    ("--part-size", "1MiB", "must be 5MiB to 5GiB (5242880 to 5368709120 bytes), a multiple of 256KiB (262144 "
                            "bytes), got 1MiB"),
    ("--part-size", "6GiB", "must be 5MiB to 5GiB (5242880 to 5368709120 bytes), a multiple of 256KiB (262144 "
                            "bytes), got 6GiB"),
    ("--part-size", "5000000", "must be 5MiB to 5GiB (5242880 to 5368709120 bytes), a multiple of 256KiB "
                               "(262144 bytes), got 5000000"),
    ("--part-size", "16MB", "MB is ambiguous (powers of 1000 or 1024?): write 16MiB (powers of 1024), got '16MB'"),
    ("--part-size", "lots", "expected bytes or a size such as 16MiB (units B, KiB, MiB, GiB, or K, M, G alike: "
                            "powers of 1024), got 'lots'"),
    ("--multipart-threshold", "4MiB", "must be 5MiB to 5GiB (5242880 to 5368709120 bytes), got 4MiB"),
    ("--files-in-flight", "0", "must be an integer in [1, 64], got 0"),
    ("--parts-in-flight", "65", "must be an integer in [1, 64], got 65"),
    ("--parts-in-flight", "1_0", "expected an integer in [1, 64], got '1_0'"),
])
def test_push_transfer_flags_out_of_range_are_usage_errors(tmp_path, capsys, flag, value, error):
    """Each of push's transfer flags is checked like pull's --streams: the usage error names the flag and its
    allowed range (TransferOptions' ranges), exit 2, nothing pushed."""
    source = tmp_path / "src"
    source.mkdir()
    (source / "model.ckpt-1.index").write_bytes(b"")
    with pytest.raises(SystemExit) as exited:
        cli.main(["push", str(source), str(tmp_path / "dest"), f"{flag}={value}"])
    assert exited.value.code == cli.EXIT_USAGE
    err = capsys.readouterr().err
    assert err.splitlines()[-1] == f"cloudckpt push: error: argument {flag}: {error}", err
    assert not (tmp_path / "dest").exists()


def test_push_transfer_flags_parse_sizes():
    parser = cli.build_parser()
    for text, size in (("16MiB", 16 << 20), ("16m", 16 << 20), ("5242880", 5 << 20), ("1.5GiB", 3 << 29),
                       (" 8 MiB ", 8 << 20), ("20480KiB", 20 << 20)):
        args = parser.parse_args(["push", "d", "memory://x", "--part-size", text, "--multipart-threshold", text])
        assert args.part_size == args.multipart_threshold == size, text
        assert cli._push_transfer(args).part_size == size
    assert cli._push_transfer(parser.parse_args(["push", "d", "memory://x"])) is None  # the defaults: transfer=None


# -- ls ---------------------------------------------------------------------------------------------

def test_ls_json_schema_table_and_incomplete(committed):
    url, name, client, endpoint = committed
    add_incomplete(client, name, 40)
    proc = subprocess.run([sys.executable, "-X", "importtime", "-m", "cloudckpt.cli", "ls", url, "--json",
                           "-o", endpoint], env=cli_env(), capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    imported = {line.split("|")[-1].strip() for line in proc.stderr.splitlines() if line.startswith("import time")}
    assert "s3fs.core" in imported and not {m for m in imported if m.split(".")[0] == "tensorflow"}
    rows = json.loads(proc.stdout)
    assert isinstance(rows, list)
    assert [(r["step"], r["status"]) for r in rows] == [(s, "committed") for s in STEPS] + [(40, "incomplete")]
    for r in rows:
        assert {"step", "status", "created_at", "size", "files"} <= r.keys()
        assert type(r["step"]) is int and type(r["size"]) is int and type(r["files"]) is int
        assert r["size"] > 0 and ISO_UTC.match(r["created_at"]), r
    assert rows[-1]["files"] == 2 and rows[-1]["prefix"] == f"{url}/model.ckpt-40"

    table = run_cli("ls", url, "-o", endpoint)
    assert table.returncode == 0 and table.stderr == ""
    header, *body = table.stdout.splitlines()
    assert header.split() == ["step", "created", "(UTC)", "size", "files", "status", "name"]
    assert [(row.split()[0], row.split()[-2], row.split()[-1]) for row in body] == \
        [(str(s), "committed", f"model.ckpt-{s}") for s in STEPS] + [("40", "incomplete", "model.ckpt-40")]
    for row, r in zip(body, rows):  # human sizes and the same timestamps as the JSON
        assert human_size(r["size"]) in row and r["created_at"] in row and row.split()[-3] == str(r["files"])


# A Keras ModelCheckpoint template with a metric (ckpt-{epoch}-{val_loss:.2f}), fit run twice from scratch: each
# run commits steps 3 and 6 under its own names.
FIRST_RUN, SECOND_RUN = ["ckpt-1-0.61-3", "ckpt-2-0.52-6"], ["ckpt-1-0.58-3", "ckpt-2-0.47-6"]


@pytest.fixture
def two_runs(bucket, moto_server, tmp_path):
    """``bucket`` with FIRST_RUN then SECOND_RUN committed (plain files in TF's naming); returns (bucket, the
    bytes of each checkpoint's .index by name)."""
    from cloudckpt.engine import CheckpointEngine

    index: dict[str, bytes] = {}
    local = tmp_path / "vm"
    with CheckpointEngine(bucket[0], str(local), storage_options=moto_server.storage_options) as engine:
        engine.open()
        for run, names in enumerate((FIRST_RUN, SECOND_RUN), 1):
            for name in names:
                files = []
                for suffix in (".index", ".data-00000-of-00001"):
                    path = local / f"{name}{suffix}"
                    path.write_bytes(f"{name} of run {run}{suffix}".encode() * 50)
                    files.append(str(path))
                index[name] = (local / f"{name}.index").read_bytes()
                engine.submit(int(name.rsplit("-", 1)[1]), files)
                engine.wait(60)
    return bucket, index


def test_ls_names_each_checkpoint_and_name_picks_one_where_a_step_is_taken(two_runs, tmp_path):
    """Two checkpoints at one step under different names: `ls` showed two rows alike but for their times (no
    name column), and `pull --step 6` takes the newer with no way to get the older one. `ls` names each
    (the older commit of a step first); `--name` picks one in pull, verify and rollback; gc's --keep counts
    checkpoints, and its summary names the ones of a shared step."""
    (url, name, client, endpoint), index = two_runs
    table, listing, older, checked, unknown, both, slash = run_cli_many(
        ["ls", url, "-o", endpoint], ["ls", url, "--json", "-o", endpoint],
        ["pull", url, str(tmp_path / "older"), "--name", FIRST_RUN[1], "-o", endpoint],
        ["verify", url, "--name", FIRST_RUN[1], "-o", endpoint],
        ["pull", url, str(tmp_path / "none"), "--name", "ckpt-3-0.40-9", "-o", endpoint],
        ["pull", url, str(tmp_path / "none"), "--step", "6", "--name", FIRST_RUN[1], "-o", endpoint],
        ["verify", url, "--name", f"{url}/{FIRST_RUN[1]}", "-o", endpoint])
    assert table.returncode == 0, table.stderr
    header, *rows = table.stdout.splitlines()
    assert header.split() == ["step", "created", "(UTC)", "size", "files", "status", "name"]
    assert [(r.split()[0], r.split()[-2], r.split()[-1]) for r in rows] == [
        ("3", "committed", FIRST_RUN[0]), ("3", "committed", SECOND_RUN[0]),
        ("6", "committed", FIRST_RUN[1]), ("6", "committed", SECOND_RUN[1])]
    assert [(r["step"], r["name"], r["prefix"]) for r in json.loads(listing.stdout)] == \
        [(int(n.rsplit("-", 1)[1]), n, f"{url}/{n}") for n in (FIRST_RUN[0], SECOND_RUN[0], FIRST_RUN[1], SECOND_RUN[1])]

    assert older.returncode == 0, older.stderr
    assert older.stdout.startswith("Pulled step 6 (2 files") and older.stdout.rstrip().endswith(f"/older/{FIRST_RUN[1]}")
    assert (tmp_path / "older" / f"{FIRST_RUN[1]}.index").read_bytes() == index[FIRST_RUN[1]]
    assert not (tmp_path / "older" / f"{SECOND_RUN[1]}.index").exists()
    assert checked.returncode == 0, checked.stdout + checked.stderr
    assert checked.stdout.splitlines()[0].startswith(f"OK      step 6: {FIRST_RUN[1]} (2 files")
    assert "1 of 1 checkpoint(s)" in checked.stdout

    assert unknown.returncode == 1
    assert one_error_line(unknown.stderr) == (
        f"cloudckpt: error: No committed checkpoint named 'ckpt-3-0.40-9' in {url} (committed: {SECOND_RUN[1]}, "
        f"{FIRST_RUN[1]}, {SECOND_RUN[0]}, {FIRST_RUN[0]}; `cloudckpt ls {url}` lists them with their steps).")
    assert both.returncode == 2 and "argument --name: not allowed with argument --step" in both.stderr
    assert slash.returncode == 2 and f"(e.g. {FIRST_RUN[1]}), without its directory" in slash.stderr
    assert not (tmp_path / "none").exists()

    dry = run_cli("gc", url, "--keep", "3", "--dry-run", "-o", endpoint)  # 3 checkpoints, not 3 steps
    assert dry.returncode == 0, dry.stderr
    assert re.findall(r"^would delete step (\d+): (\S+)", dry.stdout, re.M) == [("3", FIRST_RUN[0])]
    assert f"Keeping step(s): 3, 6 ({FIRST_RUN[1]}), 6 ({SECOND_RUN[1]})." in dry.stdout

    back = run_cli("rollback", url, "--name", FIRST_RUN[1], "-o", endpoint)
    assert back.returncode == 0, back.stderr
    assert f"to step 6 ({FIRST_RUN[1]}, commit" in back.stdout
    assert f"Superseded now: 6 ({SECOND_RUN[1]})." in back.stdout
    rows = json.loads(run_cli("ls", url, "--json", "-o", endpoint).stdout)
    assert [(r["name"], r["status"]) for r in rows if r.get("latest")] == [(FIRST_RUN[1], "committed")]


def test_download_checkpoint_takes_a_name(two_runs, moto_server, tmp_path):
    """The library calls behind the commands take name= where they take step= (keyword-only, one of the two)."""
    import cloudckpt

    (url, *_), index = two_runs
    options = moto_server.storage_options
    local = cloudckpt.download_checkpoint(url, str(tmp_path / "a"), name=FIRST_RUN[1], storage_options=options)
    assert local == str(tmp_path / "a" / FIRST_RUN[1]) and Path(local + ".index").read_bytes() == index[FIRST_RUN[1]]
    assert cloudckpt.download_checkpoint(url, str(tmp_path / "b"), step=6, storage_options=options).endswith(
        SECOND_RUN[1])
    assert cloudckpt.verify(url, name=FIRST_RUN[0], storage_options=options).name == FIRST_RUN[0]
    with pytest.raises(ConfigError, match="not both"):
        cloudckpt.download_checkpoint(url, str(tmp_path / "c"), 6, name=FIRST_RUN[1], storage_options=options)
    with pytest.raises(cloudckpt.CheckpointNotFoundError, match=f"named 'nope' in {re.escape(url)} "
                                                                f"\\(committed: {SECOND_RUN[1]}, "):
        cloudckpt.pull_checkpoint(url, str(tmp_path / "c"), name="nope", storage_options=options)
    assert not (tmp_path / "c").exists()


def test_output_whose_reader_went_away_exits_141_not_a_failed_check(committed):
    """``cloudckpt ls URL | head -1`` and ``verify --all | head -1`` exited 1, documented as "a check failed",
    though every checkpoint verified (fresh-user trial). A reader going away is what a shell reports as 141
    (128 + SIGPIPE, as ``yes | head``), with nothing on stderr."""
    url, name, client, endpoint = committed
    env = {k: v for k, v in cli_env().items() if k != "PYTHONUNBUFFERED"}  # a user's shell: stdout block-buffered
    for args in (["ls", url], ["ls", url, "--json"], ["verify", url, "--all"]):
        proc = subprocess.Popen([sys.executable, "-m", "cloudckpt.cli", *args, "-o", endpoint], env=env,
                                stdout=subprocess.PIPE, stderr=subprocess.PIPE, stdin=subprocess.DEVNULL)
        proc.stdout.close()  # the reader is gone before the first line
        err = proc.stderr.read().decode()
        assert proc.wait(120) == cli.EXIT_BROKEN_PIPE == 141, (args, proc.returncode, err)
        assert err == "", (args, err)


def test_ls_reports_unreadable_manifest_and_empty_directory(committed):
    url, name, client, endpoint = committed
    client.put_object(Bucket=name, Key="runs/exp1/model.ckpt-20.manifest.json", Body=b"{not json")
    proc = run_cli("ls", url, "--json", "-o", endpoint)
    assert proc.returncode == 1
    line = one_error_line(proc.stderr)
    assert "step 20" in line and "model.ckpt-20.manifest.json" in line
    rows = {r["step"]: r for r in json.loads(proc.stdout)}
    assert rows[20]["status"] == "unreadable" and rows[20]["files"] == 3
    assert [rows[s]["status"] for s in (0, 10, 30)] == ["committed"] * 3

    empty = run_cli("ls", url.replace("exp1", "nothing-here"), "--json", "-o", endpoint)
    assert empty.returncode == 0 and json.loads(empty.stdout) == []


# -- verify -----------------------------------------------------------------------------------------

def test_verify_exits_1_on_corrupted_object(committed, moto_server):
    url, name, client, endpoint = committed
    flip_byte(client, name, "runs/exp1/model.ckpt-30.data-00000-of-00001")
    client.delete_object(Bucket=name, Key="runs/exp1/model.ckpt-10.meta")

    latest, older, every = run_cli_many(["verify", url, "-o", endpoint],  # default: the newest checkpoint
                                        ["verify", url, "--step", "20", "-o", endpoint],
                                        ["verify", url, "--all", "-o", endpoint])
    assert latest.returncode == 1
    assert latest.stdout.startswith("FAILED  step 30")
    assert re.search(r"model\.ckpt-30\.data-00000-of-00001: checksum mismatch \(expected crc32c [0-9a-f]{8}, "
                     r"found [0-9a-f]{8}\)", latest.stdout)
    assert "30" in one_error_line(latest.stderr)

    assert older.returncode == 0, older.stdout + older.stderr
    assert older.stdout.startswith("OK      step 20")

    assert every.returncode == 1
    status = {int(m.group(2)): m.group(1) for m in re.finditer(r"^(OK|FAILED)\s+step (\d+)", every.stdout, re.M)}
    assert status == {0: "OK", 10: "FAILED", 20: "OK", 30: "FAILED"}
    assert "model.ckpt-10.meta: missing" in every.stdout
    assert "step(s) 10, 30" in one_error_line(every.stderr)



def test_verify_says_superseded_as_ls_does(committed, moto_server):
    """After a rollback to step 10, `verify --step 20` printed plain "OK step 20" for a checkpoint `ls` shows
    superseded (never restored as the latest): it says superseded, as `ls` and `gc` do."""
    import cloudckpt

    url, name, client, endpoint = committed
    cloudckpt.rollback(url, step=10, storage_options=moto_server.storage_options)
    ls, one, every = run_cli_many(["ls", url, "--json", "-o", endpoint],
                                  ["verify", url, "--step", "20", "-o", endpoint],
                                  ["verify", url, "--all", "-o", endpoint])
    assert {r["step"]: r["status"] for r in json.loads(ls.stdout)} == {0: "committed", 10: "committed",
                                                                       20: "superseded", 30: "superseded"}
    assert one.returncode == 0, one.stderr
    assert re.match(r"OK      step 20: model\.ckpt-20 \(superseded, 3 files, ", one.stdout), one.stdout
    assert every.returncode == 0, every.stderr
    marked = {int(m.group(1)): bool(m.group(2)) for m in
              re.finditer(r"^OK\s+step (\d+): \S+ \((superseded, )?\d+ files", every.stdout, re.M)}
    assert marked == {0: False, 10: False, 20: True, 30: True}, every.stdout
    report = cloudckpt.verify_checkpoints(url, 20, storage_options=moto_server.storage_options).reports[0]
    assert report.superseded and report.ok


def test_verify_nothing_to_check(committed):
    url, name, client, endpoint = committed
    absent, empty, both = run_cli_many(["verify", url, "--step", "25", "-o", endpoint],
                                       ["verify", url.replace("exp1", "empty"), "--all", "-o", endpoint],
                                       ["verify", url, "--step", "10", "--all", "-o", endpoint])
    assert absent.returncode == 1
    assert "No committed checkpoint at step 25" in one_error_line(absent.stderr)
    assert "[0, 10, 20, 30]" in absent.stderr
    assert empty.returncode == 1 and "No committed checkpoint" in one_error_line(empty.stderr)
    assert both.returncode == 2 and "not allowed with argument" in both.stderr


# -- pull -------------------------------------------------------------------------------------------

def test_pull_step_progress_on_tty_and_corruption_leaves_dir_alone(committed, tmp_path, stock_dir):
    import tensorflow as tf

    url, name, client, endpoint = committed
    target = tmp_path / "local"
    code, out, err = run_cli_tty("pull", url, str(target), "--step", "10", "-o", endpoint)
    assert code == 0, err
    assert "Pulled step 10 (3 files" in out and "verified" in out
    assert "pull step 10" in err and re.search(r"\d+%\|", err), err  # a tqdm byte bar on the terminal
    assert "Traceback" not in err
    assert tf.train.latest_checkpoint(str(target)) == str(target / "model.ckpt-10")

    flip_byte(client, name, "runs/exp1/model.ckpt-30.index")
    before = sorted(os.listdir(target))
    state = (target / "checkpoint").read_bytes()
    (tmp_path / "afile").write_text("x")
    bad, not_dir = run_cli_many(["pull", url, str(target), "-o", endpoint],
                                ["pull", url, str(tmp_path / "afile"), "-o", endpoint])
    assert bad.returncode == 1
    line = one_error_line(bad.stderr)
    assert "step 30" in line and "model.ckpt-30.index" in line and "crc32c" in line
    assert sorted(os.listdir(target)) == before and (target / "checkpoint").read_bytes() == state
    assert tf.train.latest_checkpoint(str(target)) == str(target / "model.ckpt-10")

    assert not_dir.returncode == 2 and "not a directory" in one_error_line(not_dir.stderr)


def test_pull_progress_counts_every_byte_once(committed, moto_server, tmp_path):
    """The byte progress that drives pull's and verify's bars ends exactly at the checkpoint's size."""
    from cloudckpt.catalog import scan_directory
    from cloudckpt.remote import RemoteStore
    from cloudckpt.restore import download_verified, verify_checkpoint

    store = RemoteStore(committed[0], moto_server.storage_options)
    info = scan_directory(store).committed[-1]
    downloaded, verified = [], []
    download_verified(store, info, str(tmp_path / "d"), progress=downloaded.append)
    assert sum(downloaded) == info.size and all(n > 0 for n in downloaded)
    assert verify_checkpoint(store, info, progress=verified.append).ok and sum(verified) == info.size


# -- gc ---------------------------------------------------------------------------------------------

def test_gc_dry_run_deletes_nothing_then_gc_keeps_newest(committed, moto_server):
    url, name, client, endpoint = committed
    add_incomplete(client, name, 40)  # a young upload in flight: kept by the default 1 h grace
    before = keys(client, name)

    dry = run_cli("gc", url, "--keep", "2", "--dry-run", "-o", endpoint)
    assert dry.returncode == 0, dry.stderr
    assert keys(client, name) == before
    assert re.findall(r"^would delete step (\d+)", dry.stdout, re.M) == ["0", "10"]
    assert "nothing was deleted" in dry.stdout and "Keeping step(s): 20, 30" in dry.stdout
    size = sum(json.loads(client.get_object(Bucket=name, Key=f"runs/exp1/model.ckpt-{s}.manifest.json")["Body"]
                          .read())["files"][i]["size"] for s in (0, 10) for i in range(3))
    assert human_size(size) in dry.stdout

    real = run_cli("gc", url, "--keep", "2", "-o", endpoint)
    assert real.returncode == 0, real.stderr
    assert re.findall(r"^delete step (\d+)", real.stdout, re.M) == ["0", "10"]
    assert f"Freed {human_size(size)}" in real.stdout
    left = keys(client, name)
    assert not [k for k in left if k.startswith(("model.ckpt-0.", "model.ckpt-10."))]
    assert "model.ckpt-40.index" in left  # younger than the grace period
    assert sorted(assert_all_committed_intact(url, moto_server.storage_options)) == [20, 30]
    assert state_file(url, moto_server.storage_options)["all_model_checkpoint_paths"] == \
        ["model.ckpt-20", "model.ckpt-30"]

    debris = run_cli("gc", url, "--keep", "2", "--grace-hours", "0", "-o", endpoint)
    assert debris.returncode == 0, debris.stderr
    assert re.search(r"^delete step 40: model\.ckpt-40 \(uncommitted", debris.stdout, re.M)
    assert not [k for k in keys(client, name) if k.startswith("model.ckpt-40.")]


# -- in place: rollback and gc rewrite TF's state file (no Saver is writing it then) ----------------

def test_push_in_place_commits_and_leaves_tfs_state_file_alone(stock_dir, tmp_path):
    """`cloudckpt push DIR DIR` commits TF's checkpoints where they are; the state file stays TF's (a Saver may
    be writing the directory next to it). It was rewritten with the committed lineage, relative paths."""
    import shutil

    from cloudckpt.push import push_checkpoints

    directory = tmp_path / "stock"
    shutil.copytree(stock_dir, directory)
    tfs = (directory / "checkpoint").read_bytes()
    result = push_checkpoints(str(directory), str(directory))
    assert [r.step for r in result.uploaded] == STEPS
    assert sorted(assert_all_committed_intact(str(directory), None)) == STEPS
    assert (directory / "checkpoint").read_bytes() == tfs


def test_rollback_and_gc_in_place_rewrite_the_state_file_tf_resumes_from(tmp_path):
    """In place the state file is TF's Saver's while it trains (cloudckpt's commits leave it alone), but
    `cloudckpt rollback` and `cloudckpt gc`, run with no training writing the directory, still rewrite it
    (the committed lineage, relative paths): TF restores the checkpoint rollback chose, and never one gc deleted."""
    import tensorflow as tf

    import cloudckpt
    from support.tf_model import train

    ckpt_dir = str(tmp_path / "ckpt")

    def in_place(scaffold):
        return cloudckpt.CheckpointSaverHook(ckpt_dir, save_steps=2, scaffold=scaffold, max_pending=100)

    train(in_place, last_step=8)  # the Saver keeps (max_to_keep 5) and cloudckpt commits 0, 2, 4, 6, 8
    assert tf.train.latest_checkpoint(ckpt_dir) == os.path.join(ckpt_dir, "model.ckpt-8")
    assert state_file(ckpt_dir)["model_checkpoint_path"] == [os.path.join(ckpt_dir, "model.ckpt-8")]  # TF's

    back = run_cli("rollback", ckpt_dir, "--step", "4")
    assert back.returncode == 0, back.stderr
    state = state_file(ckpt_dir)
    assert state["model_checkpoint_path"] == ["model.ckpt-4"]
    assert state["all_model_checkpoint_paths"] == ["model.ckpt-0", "model.ckpt-2", "model.ckpt-4"]
    assert tf.train.latest_checkpoint(ckpt_dir) == os.path.join(ckpt_dir, "model.ckpt-4")
    assert train(in_place, last_step=7).first_step == 4  # saves 4 (already committed) and 6 of the new branch, 7

    gc = run_cli("gc", ckpt_dir, "--keep", "2")
    assert gc.returncode == 0, gc.stderr
    assert sorted(re.findall(r"^delete step (\d+)", gc.stdout, re.M)) == ["0", "2", "4", "8"], gc.stdout
    state = state_file(ckpt_dir)
    assert state["model_checkpoint_path"] == ["model.ckpt-7"]
    assert state["all_model_checkpoint_paths"] == ["model.ckpt-6", "model.ckpt-7"]
    assert sorted(assert_all_committed_intact(ckpt_dir, None)) == [6, 7]
    assert not [n for n in os.listdir(ckpt_dir) if n.startswith(("model.ckpt-0.", "model.ckpt-2.", "model.ckpt-4.",
                                                                   "model.ckpt-8."))]
    assert tf.train.latest_checkpoint(ckpt_dir) == os.path.join(ckpt_dir, "model.ckpt-7")
    assert train(in_place, last_step=8).first_step == 7


# -- the library calls behind the commands ----------------------------------------------------------

def test_library_calls_behind_the_commands(bucket, stock_dir, moto_server, tmp_path):
    """push_checkpoints, verify_checkpoints, pull_checkpoint and gc, called from Python as the CLI calls them."""
    import cloudckpt

    url, name, client, _ = bucket
    options = moto_server.storage_options
    pushed = []
    result = cloudckpt.push_checkpoints(str(stock_dir), url, storage_options=options, on_report=pushed.append)
    assert [(r.step, r.outcome) for r in result.reports] == [(s, "uploaded") for s in STEPS]
    assert pushed == list(result.reports) and result.newest_step == 30 and len(result.uploaded) == 4
    assert sorted(assert_all_committed_intact(url, options)) == STEPS

    client.put_object(Bucket=name, Key="runs/exp1/model.ckpt-30.manifest.json", Body=b"{not json")
    flip_byte(client, name, "runs/exp1/model.ckpt-10.data-00000-of-00001")
    counted: list[tuple[int, int]] = []  # list.append is atomic: progress comes from several threads
    checked = cloudckpt.verify_checkpoints(url, all_steps=True, storage_options=options, use_store_checksums=False,
                                           progress=lambda info, n: counted.append((info.step, n)))
    seen = {step: sum(n for s, n in counted if s == step) for step, _ in counted}
    assert [(r.step, r.status) for r in checked.reports] == [(0, "ok"), (10, "failed"), (20, "ok"),
                                                             (30, "unreadable")]
    assert [r.step for r in checked.failed] == [10, 30] and not checked.ok
    assert seen == {r.step: r.size for r in checked.reports if r.files}  # every byte counted once
    assert "model.ckpt-30.manifest.json" in str(checked.reports[-1].error)
    latest = cloudckpt.verify_checkpoints(url, storage_options=options)  # the newest step: the unreadable one
    assert [(r.step, r.status) for r in latest.reports] == [(30, "unreadable")]

    pulled = cloudckpt.pull_checkpoint(url, str(tmp_path / "local"), storage_options=options)
    assert pulled.checkpoint.step == 20 and pulled.passed_over == (30,)
    assert pulled.local_prefix == str(tmp_path / "local" / "model.ckpt-20")
    with pytest.raises(cloudckpt.ManifestError):  # the strict form never skips the newest silently
        cloudckpt.download_checkpoint(url, str(tmp_path / "strict"), storage_options=options)

    before = keys(client, name)
    plan = cloudckpt.gc(url, 2, grace_seconds=0, dry_run=True, storage_options=options)
    assert [c.step for c in plan.plan.delete] == [0] and [s for s, _ in plan.left_alone] == [30] and plan.dry_run
    assert keys(client, name) == before
    with pytest.raises(ConfigError, match="does not exist"):
        cloudckpt.pull_checkpoint(f"s3://no-such-bucket-{uuid.uuid4().hex[:8]}/run", str(tmp_path / "x"),
                                  storage_options=options)


# -- errors -----------------------------------------------------------------------------------------

def test_errors_are_one_line_with_documented_exit_codes(moto_server, bucket):
    url, name, client, endpoint = bucket
    secret = "S3CR3T-VALUE-never-printed"
    missing, unknown, negative, bad_option, conflict, syntax, unreachable, debug = run_cli_many(
        ["ls", f"s3://no-such-bucket-{uuid.uuid4().hex[:8]}/run", "-o", endpoint, "-o", "key=testing",
         "-o", f"secret={secret}"],
        ["gc", "nosuchscheme://x/y", "--keep", "1"],
        ["gc", url, "--keep", "-1", "-o", endpoint],
        ["verify", url, "-o", endpoint, "-o", f"not_a_real_option={secret}"],
        ["ls", url, "-o", f"client_kwargs={secret}", "-o", "client_kwargs.region_name=x"],
        ["ls", url, "-o", secret],
        ["ls", "s3://some-bucket/run", "-o", "endpoint_url=http://127.0.0.1:9", "-o",
         "config_kwargs.retries.max_attempts=1", "-o", "config_kwargs.connect_timeout=1", "--max-attempts", "1"],
        ["ls", "nosuchscheme://x/y", "--debug"])

    assert missing.returncode == 2  # configuration: the bucket does not exist
    assert "does not exist" in one_error_line(missing.stderr)
    assert unknown.returncode == 2 and "Unknown protocol" in one_error_line(unknown.stderr)
    assert negative.returncode == 2 and "--keep: must be an integer >= 0, got -1" in negative.stderr
    assert bad_option.returncode == 2
    assert "not_a_real_option" in one_error_line(bad_option.stderr)
    assert conflict.returncode == 2 and "client_kwargs" in one_error_line(conflict.stderr)
    assert syntax.returncode == 2 and "KEY=VALUE" in syntax.stderr  # argparse: usage + one error line
    for proc in (missing, bad_option, conflict, syntax):
        assert secret not in proc.stderr + proc.stdout

    assert unreachable.returncode == 1  # a storage error (RemoteError)
    line = one_error_line(unreachable.stderr)
    assert "s3://some-bucket/run" in line and "EndpointConnectionError" in line
    assert "next checkpoint" not in line  # the hook's hint does not apply to the CLI

    assert debug.returncode != 0 and "Traceback" in debug.stderr and "ConfigError" in debug.stderr


def test_unexpected_exception_is_one_line(monkeypatch, capsys):
    def boom(args):
        raise RuntimeError("something odd\nsecond line")

    monkeypatch.setattr(cli, "cmd_ls", boom)
    assert cli.main(["ls", "memory://x"]) == 1
    err = capsys.readouterr().err
    assert one_error_line(err) == ("cloudckpt: error: unexpected RuntimeError: something odd second line "
                                   "(rerun with --debug for the traceback)")
    assert cli.main(["ls", "memory://x", "--debug"]) == 1  # the documented exit code, plus the traceback
    err = capsys.readouterr().err
    assert "Traceback (most recent call last)" in err and "RuntimeError: something odd" in err



def test_an_error_without_specific_advice_points_to_debug(tmp_path):
    """Missing credentials: the CLI said "rerun with logging at DEBUG for details", advice for library users
    (who configure logging); the CLI's wording is --debug. The library keeps its own (errors.DEBUG_HINT)."""
    from cloudckpt.errors import DEBUG_HINT

    env = {k: v for k, v in cli_env().items() if not k.startswith(("AWS_", "BOTO"))}
    env.update(HOME=str(tmp_path), AWS_CONFIG_FILE=str(tmp_path / "none"), AWS_EC2_METADATA_DISABLED="true",
               AWS_SHARED_CREDENTIALS_FILE=str(tmp_path / "none"), AWS_DEFAULT_REGION="us-east-1")
    url, endpoint = "s3://bucket/run", "endpoint_url=http://127.0.0.1:9"  # never reached: no credentials
    proc = subprocess.run([sys.executable, "-m", "cloudckpt.cli", "ls", url, "-o", endpoint], env=env,
                          capture_output=True, text=True, timeout=120, stdin=subprocess.DEVNULL)
    assert proc.returncode == 1, proc.stderr
    line = one_error_line(proc.stderr)
    assert "NoCredentialsError" in line and f"; {cli.CLI_DEBUG_HINT})." in line, line
    assert "logging at DEBUG" not in line, line
    library = subprocess.run(
        [sys.executable, "-c", "import cloudckpt\ntry:\n    cloudckpt.list_checkpoints('s3://bucket/run', "
         "{'endpoint_url': 'http://127.0.0.1:9'})\nexcept cloudckpt.RemoteError as exc:\n    print(exc)"],
        env=env, capture_output=True, text=True, timeout=120, stdin=subprocess.DEVNULL)
    assert "NoCredentialsError" in library.stdout and f"; {DEBUG_HINT})." in library.stdout, library


def test_debug_keeps_the_exit_code_of_a_configuration_error(capsys, tmp_path):
    missing = str(tmp_path / "missing")
    assert cli.main(["ls", missing]) == 2
    assert cli.main(["ls", missing, "--debug"]) == 2  # the traceback is extra, the exit code the documented one
    assert "Traceback (most recent call last)" in capsys.readouterr().err


# -- demo (started by the demo_run fixture at the beginning of the module) --------------------------

def test_demo(demo_run):
    proc, out = demo_run
    code = proc.wait(timeout=240)
    text = out.read_text()
    assert code == 0, text
    assert "OK: the final checkpoint is committed." in text
    assert re.findall(r"^\s+(\d+)\s+\d{4}-\d\d-\d\dT", text, re.M) == ["0", "3", "6", "9"]
    assert "The new VM restored step 6 from the bucket and trained to step 9." in text
    assert "Traceback" not in text


@pytest.mark.parametrize("argv, error", [
    (["pull", "memory://x/run", "DEST", "--streams", "1_0"], "argument --streams: expected an integer in [1, 64], "
                                                              "got '1_0'"),
    (["gc", "memory://x/run", "--keep", "1_0"], "argument --keep: expected an integer >= 0, got '1_0'"),
    (["gc", "memory://x/run", "--keep", "\u0661"], "argument --keep: expected an integer >= 0, got '\u0661'"),
    (["gc", "memory://x/run", "--keep", "2.0"], "argument --keep: expected an integer >= 0, got '2.0'"),
    (["gc", "memory://x/run", "--keep", "1", "--keep-every-hours", "inf"],
     "argument --keep-every-hours: expected a number, got 'inf'"),
    (["gc", "memory://x/run", "--keep", "1", "--grace-hours", "nan"],
     "argument --grace-hours: expected a number, got 'nan'"),
    (["gc", "memory://x/run", "--keep", "1", "--grace-hours", "1_5"],
     "argument --grace-hours: expected a number, got '1_5'"),
    (["gc", "memory://x/run", "--keep", "1", "--grace-hours", "\u0661"],
     "argument --grace-hours: expected a number, got '\u0661'"),
    (["gc", "memory://x/run", "--keep", "1", "--keep-every-hours", "\uff11\uff12"],
     "argument --keep-every-hours: expected a number, got '\uff11\uff12'"),
])
def test_numbers_python_parses_but_a_user_would_not_type_are_usage_errors(tmp_path, capsys, argv, error):
    """``int()`` and ``float()`` take "1_0" (10), Arabic-Indic digits, "inf" and "nan": none of them is a count
    or a number of hours a user means; each is the flag's usage error (exit 2), nothing done."""
    argv = [str(tmp_path / "dest") if a == "DEST" else a for a in argv]
    with pytest.raises(SystemExit) as exited:
        cli.main(argv)
    assert exited.value.code == cli.EXIT_USAGE
    err = capsys.readouterr().err
    assert err.splitlines()[-1] == f"cloudckpt {argv[0]}: error: {error}", err
    assert not (tmp_path / "dest").exists()


@pytest.mark.parametrize("streams", ["0", "65", "-3"])
def test_pull_streams_out_of_range_is_a_clear_error(tmp_path, capsys, streams):
    """``pull --streams`` is TransferOptions.max_download_streams: out of range at either end, the same usage
    error naming the flag and the range (exit 2), nothing downloaded."""
    with pytest.raises(SystemExit) as exited:
        cli.main(["pull", "memory://x/run", str(tmp_path / "dest"), "--streams", streams])
    assert exited.value.code == cli.EXIT_USAGE
    err = capsys.readouterr().err
    assert err.splitlines()[-1] == f"cloudckpt pull: error: argument --streams: must be an integer in [1, 64], " \
                                   f"got {streams}", err
    assert "max_download_streams" not in err and "Traceback" not in err
    assert not (tmp_path / "dest").exists()


SLOW_IMPORT = Path(__file__).resolve().parent / "support" / "slow_import"  # its sitecustomize holds up an import


@pytest.mark.parametrize("entry", ["console script", "python -m cloudckpt", "python -m cloudckpt.cli"])
def test_ctrl_c_while_the_cli_starts_exits_130_without_a_traceback(tmp_path, entry):
    """A Ctrl-C while ``import cloudckpt`` loaded its modules (storage, fsspec: about 0.4 s of a command's
    start) printed a Python traceback and ended the process by SIGINT; the rest of the CLI says
    "interrupted" in one line and exits 130. The SIGINT is sent while the child is held inside the import
    of cloudckpt.remote (support/slow_import/sitecustomize.py), so it lands there, not by timing luck."""
    script = Path(sys.executable).parent / "cloudckpt"
    command = {"console script": [str(script)], "python -m cloudckpt": [sys.executable, "-m", "cloudckpt"],
               "python -m cloudckpt.cli": [sys.executable, "-m", "cloudckpt.cli"]}[entry]
    if entry == "console script" and not script.exists():
        pytest.skip(f"no console script at {script} (cloudckpt not installed in this environment)")
    env = cli_env()
    env["PYTHONPATH"] = os.pathsep.join(p for p in (str(SLOW_IMPORT), env.get("PYTHONPATH")) if p)
    env["CLOUDCKPT_SLOW_IMPORT"] = "cloudckpt.remote"
    proc = subprocess.Popen([*command, "ls", str(tmp_path)], env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, stdin=subprocess.DEVNULL, text=True)
    try:
        held = proc.stderr.readline()
        assert held == "importing cloudckpt.remote\n", (held, proc.stderr.read())
        proc.send_signal(signal.SIGINT)
        out, err = proc.communicate(timeout=60)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert proc.returncode == cli.EXIT_INTERRUPTED == 130, (proc.returncode, err)
    assert err == "cloudckpt: interrupted\n" and out == ""


def test_import_cloudckpt_loads_its_public_names_at_first_use():
    """What keeps the command's start (before its Ctrl-C handling) short: ``import cloudckpt`` loads no
    storage stack; each public name loads its module at first use; ``cloudckpt.rollback`` stays the function
    after its module is imported (``import cloudckpt.rollback``), as when every name was imported at once."""
    code = """if True:
        import sys, cloudckpt
        assert not {"fsspec", "cloudckpt.remote", "cloudckpt.catalog"} & set(sys.modules), sorted(sys.modules)
        assert callable(cloudckpt.catalog.scan_directory) and cloudckpt.preemption.signals  # submodules, as before
        from cloudckpt.rollback import RollbackResult
        import cloudckpt.rollback
        assert cloudckpt.rollback is sys.modules["cloudckpt.rollback"].rollback and callable(cloudckpt.rollback)
        assert cloudckpt.RollbackResult is RollbackResult
        adapters = {"CheckpointSaverHook", "UploadListener", "CheckpointManager"}  # TensorFlow: not loaded here
        for name in set(cloudckpt.__all__) - adapters:
            value = getattr(cloudckpt, name)
            assert getattr(value, "__name__", name) == name, (name, value)
        assert set(cloudckpt.__all__) <= set(dir(cloudckpt))
        assert "tensorflow" not in sys.modules
        try:
            cloudckpt.no_such_name
        except AttributeError as exc:
            assert "no_such_name" in str(exc)
        else:
            raise AssertionError("no AttributeError")
    """
    subprocess.run([sys.executable, "-c", code], check=True, timeout=120, env=cli_env())


def test_python_dash_m_cloudckpt_is_the_cli(tmp_path):
    """``python -m cloudckpt`` runs the same command line as the console script (a checkout without it
    installed); its exit codes too."""
    empty = tmp_path / "empty"
    empty.mkdir()
    shown = subprocess.run([sys.executable, "-m", "cloudckpt", "ls", str(empty), "--json"], capture_output=True,
                           text=True, timeout=120)
    assert shown.returncode == 0, shown.stderr
    assert json.loads(shown.stdout) == []
    missing = subprocess.run([sys.executable, "-m", "cloudckpt", "verify", str(empty)], capture_output=True,
                             text=True, timeout=120)
    assert missing.returncode == cli.EXIT_CHECK_FAILED and "No committed checkpoint" in missing.stderr, missing.stderr


def test_storage_options_before_the_command_apply_as_after_it(bucket):
    """``cloudckpt -o endpoint_url=... ls URL`` (options before the command, the natural order at a prompt)
    does what ``cloudckpt ls URL -o ...`` does; before, argparse took the option's value for the command
    ("invalid choice: 'endpoint_url=...'"). A dead endpoint in the environment would catch an option dropped."""
    url, _, _, endpoint = bucket
    env = {**cli_env(), "AWS_ENDPOINT_URL": "http://127.0.0.1:9"}  # only the -o endpoint reaches the server
    procs = [subprocess.run([sys.executable, "-m", "cloudckpt.cli", *args], env=env, capture_output=True, text=True,
                            timeout=120, stdin=subprocess.DEVNULL)
             for args in (["-o", endpoint, "ls", url, "--json"], ["ls", url, "--json", "-o", endpoint],
                          ["-o", endpoint, "--max-attempts", "1", "ls", url, "--json"],
                          ["-o", endpoint, "ls", url, "--json", "-o", "client_kwargs.region_name=us-east-1"],
                          ["-o", endpoint, "demo"])]
    before, after, both, split, demo = procs
    assert (before.returncode, after.returncode, both.returncode, split.returncode) == (0, 0, 0, 0), \
        (before.stderr, both.stderr, split.stderr)  # split: an -o after the command kept the ones before it
    assert json.loads(before.stdout) == json.loads(after.stdout) == json.loads(both.stdout) \
        == json.loads(split.stdout) == []
    assert demo.returncode == 2 and "demo takes no --storage-option" in demo.stderr, demo.stderr


def test_a_signal_while_python_exits_after_the_command_keeps_its_exit_code(tmp_path):
    """SIGTERM (or Ctrl-C) arriving after the command finished and printed its result, while the interpreter
    shuts down (atexit handlers, threads), ends the process with the command's own exit code. Before: the
    command's SIGTERM handler was gone by then, so a finished ``pull`` ended as killed by SIGTERM (a shell's
    143), and a script's ``cloudckpt pull ... || fallback`` took a good pull for a failed one."""
    import signal

    empty = tmp_path / "empty"
    empty.mkdir()
    code = ("import atexit, runpy, sys, time\n"
            "atexit.register(lambda: (sys.stderr.write('EXITING\\n'), sys.stderr.flush(), time.sleep(30)))\n"
            f"sys.argv = ['cloudckpt', 'ls', {str(empty)!r}]\n"
            "runpy.run_module('cloudckpt', run_name='__main__')\n")
    plain = run_cli("ls", str(empty))
    for sig in (signal.SIGTERM, signal.SIGINT):
        proc = subprocess.Popen([sys.executable, "-c", code], env=cli_env(), stdout=subprocess.PIPE,
                                stderr=subprocess.PIPE, stdin=subprocess.DEVNULL, text=True)
        try:
            for line in proc.stderr:
                if line.strip() == "EXITING":
                    break
            proc.send_signal(sig)
            out, _ = proc.communicate(timeout=20)
        finally:
            proc.kill()
        assert proc.returncode == plain.returncode, (sig, proc.returncode, plain.returncode)
        assert out == plain.stdout
