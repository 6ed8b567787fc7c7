"""An in-process S3 server (moto's server mode) for the demo, tests and benchmarks.

Real HTTP on 127.0.0.1, so the s3fs/botocore code path is exactly the one
used against AWS; conditional writes are decided atomically, as S3 does
(``moto_mock.serialize_conditional_writes``). Needs the ``demo`` extra:
``pip install 'cloudckpt[demo]'``.
"""

from __future__ import annotations

import logging
import os
import socket
from typing import Any

from .errors import ConfigError
from .moto_mock import serialize_conditional_writes

# moto accepts any credentials; these only keep botocore from looking for real ones.
_FAKE_CREDENTIALS = {"AWS_ACCESS_KEY_ID": "testing", "AWS_SECRET_ACCESS_KEY": "testing"}


def free_port() -> int:
    """A TCP port on 127.0.0.1 that is free right now."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _check_port_free(port: int) -> None:
    """Raise ConfigError when 127.0.0.1:``port`` cannot be listened on: moto's ThreadedMotoServer.start()
    would wait forever for a server whose thread died of "Address already in use"."""
    with socket.socket() as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # as the server's socket: TIME_WAIT is no obstacle
        try:
            s.bind(("127.0.0.1", port))
            s.listen()
        except OSError as exc:
            raise ConfigError(f"Cannot serve S3 on 127.0.0.1:{port}: {exc.strerror or exc} (another program "
                              "listens there?); pick another port, or none for a free one.") from None


class EmbeddedS3:
    """A moto S3 server on 127.0.0.1 with helpers to create buckets.

    Use as a context manager, or call ``start``/``stop``. ``storage_options``
    is what to pass to cloudckpt for ``s3://`` URLs served by it.
    """

    def __init__(self, port: int | None = None) -> None:
        try:
            from moto.server import ThreadedMotoServer
        except ImportError as exc:
            raise ConfigError(
                "The embedded S3 server needs moto: pip install 'cloudckpt[demo]' (or 'moto[server]').") from exc
        self._environ_set: list[str] = []
        self.port = port or free_port()
        self.endpoint = f"http://127.0.0.1:{self.port}"
        logging.getLogger("werkzeug").setLevel(logging.ERROR)  # one access-log line per request otherwise
        serialize_conditional_writes()  # create-only writes decided atomically, as S3 does
        self._server = ThreadedMotoServer(ip_address="127.0.0.1", port=self.port, verbose=False)

    @property
    def storage_options(self) -> dict[str, Any]:
        """fsspec storage_options for s3fs to reach this server."""
        return {"endpoint_url": self.endpoint, "key": _FAKE_CREDENTIALS["AWS_ACCESS_KEY_ID"],
                "secret": _FAKE_CREDENTIALS["AWS_SECRET_ACCESS_KEY"]}

    def start(self) -> "EmbeddedS3":
        """Start serving (returns self).

        While it serves, ``AWS_DEFAULT_REGION`` (moto creates buckets in the region botocore reports; it
        must be a plain region) and fake credentials are set in ``os.environ`` where unset, so clients
        that only read the environment reach it too; ``stop`` removes what it set.

        Raises:
            ConfigError: the port is in use (moto's own start would wait forever).
        """
        _check_port_free(self.port)
        defaults = {"AWS_DEFAULT_REGION": "us-east-1", **_FAKE_CREDENTIALS}
        self._environ_set = [key for key in defaults if key not in os.environ]
        os.environ.update({key: defaults[key] for key in self._environ_set})
        self._server.start()
        return self

    def stop(self) -> None:
        """Stop serving and remove the environment variables ``start`` set."""
        self._server.stop()
        for key in self._environ_set:
            os.environ.pop(key, None)
        self._environ_set = []

    def client(self) -> Any:
        """A boto3 S3 client for this server."""
        import boto3

        return boto3.client("s3", endpoint_url=self.endpoint, region_name="us-east-1",
                            aws_access_key_id=_FAKE_CREDENTIALS["AWS_ACCESS_KEY_ID"],
                            aws_secret_access_key=_FAKE_CREDENTIALS["AWS_SECRET_ACCESS_KEY"])

    def create_bucket(self, name: str) -> str:
        """Create a bucket; return its ``s3://`` URL."""
        self.client().create_bucket(Bucket=name)
        return f"s3://{name}"

    def delete_bucket(self, name: str) -> None:
        """Delete bucket ``name`` with every object and unfinished multipart upload in it (no-op if missing)."""
        from botocore.exceptions import ClientError

        client = self.client()
        try:
            for page in client.get_paginator("list_multipart_uploads").paginate(Bucket=name):
                for upload in page.get("Uploads", []):
                    client.abort_multipart_upload(Bucket=name, Key=upload["Key"], UploadId=upload["UploadId"])
            for page in client.get_paginator("list_objects_v2").paginate(Bucket=name):
                keys = [{"Key": o["Key"]} for o in page.get("Contents", [])]
                if keys:
                    client.delete_objects(Bucket=name, Delete={"Objects": keys, "Quiet": True})
            client.delete_bucket(Bucket=name)
        except ClientError as exc:
            if exc.response["Error"].get("Code") != "NoSuchBucket":
                raise

    def __enter__(self) -> "EmbeddedS3":
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()


def main(argv: list[str] | None = None) -> int:
    """``python -m cloudckpt.embedded [--port N]``: serve until Ctrl-C or SIGTERM, for training runs in other
    processes to stop and resume against (one line on stdout: the endpoint and the storage options)."""
    import argparse
    import json
    import signal
    import sys
    import threading

    parser = argparse.ArgumentParser(prog="python -m cloudckpt.embedded",
                                     description="An S3 server (moto) on 127.0.0.1 until Ctrl-C.")
    parser.add_argument("--port", type=int, default=None, help="TCP port (default: a free one)")
    args = parser.parse_args(argv)
    stop = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: stop.set())
    try:
        server = EmbeddedS3(args.port).start()
    except ConfigError as exc:
        sys.stderr.write(f"error: {exc}\n")
        return 2
    try:
        sys.stdout.write(f"S3 server at {server.endpoint}; storage_options="
                         f"{json.dumps(server.storage_options)}; Ctrl-C stops it.\n")
        sys.stdout.flush()
        while not stop.wait(0.5):
            pass
    except KeyboardInterrupt:
        pass
    finally:
        server.stop()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
