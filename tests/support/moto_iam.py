"""A moto S3 + IAM server in a child process, with IAM enforcement on.

moto's "enforce IAM" switch and its backends are process-global, so a server
that enforces credentials runs in its own process: the session's shared moto
server (tests/conftest.py) is never affected.
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import time
import urllib.request
import uuid
from typing import Any

from cloudckpt.embedded import free_port


class IamMoto:
    """``with IamMoto() as aws:`` a bucket, an admin, and a ``trainer`` user allowed ``s3:*`` on it.

    ``aws.trainer_options`` are storage_options with the trainer's keys;
    ``aws.revoke_trainer()`` deletes its access key (every later request: 403 InvalidAccessKeyId).
    """

    def __init__(self) -> None:
        self.port = free_port()
        self.endpoint = f"http://127.0.0.1:{self.port}"
        self.bucket = f"iam-{uuid.uuid4().hex[:10]}"
        self._proc: subprocess.Popen | None = None

    def __enter__(self) -> "IamMoto":
        env = {k: v for k, v in os.environ.items() if not k.lower().endswith("_proxy")}
        self._proc = subprocess.Popen(
            [sys.executable, "-c", "from moto.server import main; main()", "-H", "127.0.0.1", "-p", str(self.port)],
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env=env)
        deadline = time.monotonic() + 60
        while True:
            try:
                socket.create_connection(("127.0.0.1", self.port), timeout=1).close()
                break
            except OSError:
                if time.monotonic() > deadline or self._proc.poll() is not None:
                    self.__exit__()
                    raise RuntimeError("moto server did not start") from None
                time.sleep(0.1)
        self._setup()
        return self

    def __exit__(self, *exc: object) -> None:
        if self._proc is not None:
            self._proc.terminate()
            self._proc.wait(30)

    def _client(self, service: str, key: str, secret: str) -> Any:
        import boto3

        return boto3.client(service, endpoint_url=self.endpoint, region_name="us-east-1",
                            aws_access_key_id=key, aws_secret_access_key=secret)

    def _setup(self) -> None:
        iam = self._client("iam", "setup", "setup")  # any credentials do before enforcement is on
        self._client("s3", "setup", "setup").create_bucket(Bucket=self.bucket)
        iam.create_user(UserName="admin")
        iam.put_user_policy(UserName="admin", PolicyName="admin", PolicyDocument=json.dumps(
            {"Version": "2012-10-17", "Statement": [{"Effect": "Allow", "Action": "*", "Resource": "*"}]}))
        admin = iam.create_access_key(UserName="admin")["AccessKey"]
        iam.create_user(UserName="trainer")
        iam.put_user_policy(UserName="trainer", PolicyName="bucket", PolicyDocument=json.dumps(
            {"Version": "2012-10-17", "Statement": [{"Effect": "Allow", "Action": "s3:*", "Resource": [
                f"arn:aws:s3:::{self.bucket}", f"arn:aws:s3:::{self.bucket}/*"]}]}))
        trainer = iam.create_access_key(UserName="trainer")["AccessKey"]
        self._admin = (admin["AccessKeyId"], admin["SecretAccessKey"])
        self._trainer_key_id = trainer["AccessKeyId"]
        self.trainer_options = {"endpoint_url": self.endpoint, "key": trainer["AccessKeyId"],
                                "secret": trainer["SecretAccessKey"]}
        request = urllib.request.Request(f"{self.endpoint}/moto-api/reset-auth", data=b"0", method="POST",
                                         headers={"Content-Type": "text/plain"})
        with urllib.request.build_opener(urllib.request.ProxyHandler({})).open(request, timeout=10) as response:
            response.read()

    def revoke_trainer(self) -> None:
        """Delete the trainer's access key, as an administrator revoking credentials mid-run would."""
        self._client("iam", *self._admin).delete_access_key(UserName="trainer", AccessKeyId=self._trainer_key_id)

    @property
    def admin_options(self) -> dict[str, Any]:
        """storage_options with the administrator's keys (to inspect the bucket)."""
        return {"endpoint_url": self.endpoint, "key": self._admin[0], "secret": self._admin[1]}

    @property
    def url(self) -> str:
        return f"s3://{self.bucket}/runs/exp1"
