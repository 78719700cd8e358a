"""A real S3-compatible server on loopback (moto's), started by the tests and the benchmark themselves.

Signatures are checked: the server starts open, makes a bucket and an IAM user allowed every S3
action, then turns authentication on, so wrong credentials are refused as S3 refuses them.
`with LocalS3() as s3:` runs one.
"""

from __future__ import annotations

import json
import logging
import socket
import urllib.request
import uuid
from dataclasses import dataclass, field
from typing import Any

REGION = "us-east-1"
ALLOW_S3 = {"Version": "2012-10-17", "Statement": [{"Effect": "Allow", "Action": "s3:*", "Resource": "*"}]}


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


@dataclass
class LocalS3:
    """moto's server on 127.0.0.1, with a user whose key may do anything in S3."""

    endpoint_url: str = ""
    key: str = field(default="", repr=False)
    secret: str = field(default="", repr=False)
    _server: Any = field(default=None, repr=False)

    def start(self) -> LocalS3:
        import boto3
        from moto.server import ThreadedMotoServer

        # The server runs in the test's process: its DEBUG lines (each request, headers and all) would
        # land in the logs the tests search for credentials, and they are not the tap's.
        logging.getLogger("moto").setLevel(logging.INFO)
        port = free_port()
        self._server = ThreadedMotoServer(ip_address="127.0.0.1", port=port, verbose=False)
        self._server.start()
        self.endpoint_url = f"http://127.0.0.1:{port}"
        # While authentication is off, any key works: make the user whose key will.
        setup = {"aws_access_key_id": "setup", "aws_secret_access_key": "setup"}
        iam = boto3.client("iam", endpoint_url=self.endpoint_url, region_name=REGION, **setup)
        user = f"tap-{uuid.uuid4().hex[:8]}"
        iam.create_user(UserName=user)
        access = iam.create_access_key(UserName=user)["AccessKey"]
        iam.put_user_policy(UserName=user, PolicyName="s3", PolicyDocument=json.dumps(ALLOW_S3))
        self.key, self.secret = access["AccessKeyId"], access["SecretAccessKey"]
        self._set_authentication(True)
        return self

    def __enter__(self) -> LocalS3:
        return self.start()

    def __exit__(self, *exc_info: object) -> None:
        self.stop()

    def stop(self) -> None:
        # moto keeps its setting and its buckets and users per process, not per server: leave them as found.
        self._set_authentication(False)
        self._moto_api("reset", b"")
        self._server.stop()

    def _set_authentication(self, on: bool) -> None:
        self._moto_api("reset-auth", b"0" if on else b"inf")

    def _moto_api(self, action: str, body: bytes) -> None:
        url = f"{self.endpoint_url}/moto-api/{action}"
        request = urllib.request.Request(url, data=body, method="POST", headers={"Content-Type": "text/plain"})
        urllib.request.urlopen(request, timeout=10).close()

    def client(self) -> Any:
        import boto3

        return boto3.client(
            "s3",
            endpoint_url=self.endpoint_url,
            region_name=REGION,
            aws_access_key_id=self.key,
            aws_secret_access_key=self.secret,
        )

    def new_bucket(self) -> str:
        name = f"exports-{uuid.uuid4().hex[:12]}"
        self.client().create_bucket(Bucket=name)
        return name

    def buckets(self) -> set[str]:
        return {bucket["Name"] for bucket in self.client().list_buckets()["Buckets"]}

    def keys(self, bucket: str) -> list[str]:
        pages = self.client().get_paginator("list_objects_v2").paginate(Bucket=bucket)
        return sorted(item["Key"] for page in pages for item in page.get("Contents", []))

    def read(self, url: str) -> bytes:
        bucket, _, key = url.removeprefix("s3://").partition("/")
        return self.client().get_object(Bucket=bucket, Key=key)["Body"].read()

    def storage_params(self) -> dict[str, Any]:
        """`batch_config.storage.params` with the credentials in it (the environment is the other way)."""
        return {"endpoint_url": self.endpoint_url, "key": self.key, "secret": self.secret}

    def environment(self) -> dict[str, str]:
        """The same as the standard AWS variables, which s3fs (botocore) reads without any params."""
        return {
            "AWS_ACCESS_KEY_ID": self.key,
            "AWS_SECRET_ACCESS_KEY": self.secret,
            "AWS_ENDPOINT_URL_S3": self.endpoint_url,
            "AWS_DEFAULT_REGION": REGION,
        }
