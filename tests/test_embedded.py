"""``cloudckpt.embedded``: the in-process S3 server (moto), and ``python -m cloudckpt.embedded``, the same
server for runs in other processes to stop and resume against."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys

import cloudckpt
from cloudckpt.embedded import free_port


def test_python_m_cloudckpt_embedded_serves_other_processes_until_sigterm(tmp_path):
    port = free_port()
    env = {k: v for k, v in os.environ.items() if not k.lower().endswith("_proxy")}
    server = subprocess.Popen([sys.executable, "-m", "cloudckpt.embedded", "--port", str(port)], env=env,
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        line = server.stdout.readline()
        assert line.startswith(f"S3 server at http://127.0.0.1:{port};"), (line, server.stderr.read())
        options = json.loads(line.split("storage_options=", 1)[1].split("; Ctrl-C", 1)[0])
        assert options["endpoint_url"] == f"http://127.0.0.1:{port}"
        import boto3

        boto3.client("s3", endpoint_url=options["endpoint_url"], region_name="us-east-1",
                     aws_access_key_id=options["key"], aws_secret_access_key=options["secret"]
                     ).create_bucket(Bucket="served")
        local = tmp_path / "run"
        local.mkdir()
        (local / "ckpt-3.index").write_bytes(b"index")
        (local / "ckpt-3.data-00000-of-00001").write_bytes(b"data" * 100)
        result = cloudckpt.push_checkpoints(str(local), "s3://served/run", storage_options=options)
        assert [r.step for r in result.uploaded] == [3]
        assert cloudckpt.latest_checkpoint("s3://served/run", options).step == 3
        server.send_signal(signal.SIGTERM)
        assert server.wait(30) == 0, server.stderr.read()
    finally:
        if server.poll() is None:
            server.kill()
            server.wait()


def test_a_port_in_use_is_an_error_not_a_hang():
    """moto's ThreadedMotoServer.start() waits forever when its server thread dies of "Address already in
    use": `python -m cloudckpt.embedded --port 5000` on a machine where 5000 is taken (macOS's AirPlay
    receiver) hung without a word on stdout, and so did EmbeddedS3(port).start()."""
    import socket

    import pytest

    from cloudckpt.embedded import EmbeddedS3

    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        env = {k: v for k, v in os.environ.items() if not k.lower().endswith("_proxy")}
        try:
            done = subprocess.run([sys.executable, "-m", "cloudckpt.embedded", "--port", str(port)], env=env,
                                  capture_output=True, text=True, timeout=60)
        except subprocess.TimeoutExpired as hung:
            raise AssertionError(f"still waiting after 60 s: {hung.stderr!r}") from None
        assert done.returncode == 2 and f"127.0.0.1:{port}" in done.stderr and done.stdout == "", done
        with pytest.raises(cloudckpt.ConfigError, match=f"127.0.0.1:{port}"):
            EmbeddedS3(port).start()
