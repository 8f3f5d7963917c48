"""A real S3 API on loopback: moto's server, in a thread of the test process, which boto3
(ours in the test process, and a worker process's) talks to over HTTP like any S3 store."""

from __future__ import annotations

import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass

# boto3's usual environment, pointed at nothing real: fixed test credentials, no shared
# config or credentials file, and never the instance metadata address.
CREDENTIALS = {
    "AWS_ACCESS_KEY_ID": "studiox-test",
    "AWS_SECRET_ACCESS_KEY": "studiox-test-secret",
    "AWS_DEFAULT_REGION": "us-east-1",
    "AWS_CONFIG_FILE": "/nonexistent",
    "AWS_SHARED_CREDENTIALS_FILE": "/nonexistent",
    "AWS_EC2_METADATA_DISABLED": "true",
}


@dataclass
class S3Server:
    endpoint_url: str

    def client(self):
        import boto3

        return boto3.session.Session(
            aws_access_key_id=CREDENTIALS["AWS_ACCESS_KEY_ID"],
            aws_secret_access_key=CREDENTIALS["AWS_SECRET_ACCESS_KEY"],
            region_name=CREDENTIALS["AWS_DEFAULT_REGION"],
        ).client("s3", endpoint_url=self.endpoint_url)

    def new_bucket(self, prefix: str = "studiox-test") -> str:
        name = f"{prefix}-{uuid.uuid4().hex[:12]}"
        self.client().create_bucket(Bucket=name)
        return name

    def keys(self, bucket: str) -> list[str]:
        """Every object key in the bucket, sorted."""
        found: list[str] = []
        for page in self.client().get_paginator("list_objects_v2").paginate(Bucket=bucket):
            found += [item["Key"] for item in page.get("Contents", ())]
        return sorted(found)

    def env(self, bucket: str, prefix: str = "") -> dict[str, str]:
        """What a process needs to use this server as its storage (STORAGE_URL and the rest)."""
        url = f"s3://{bucket}/{prefix}" if prefix else f"s3://{bucket}"
        return {**CREDENTIALS, "STORAGE_URL": url, "S3_ENDPOINT_URL": self.endpoint_url}


# Anything in the machine's environment that would send boto3 elsewhere.
SCRUBBED = ("AWS_PROFILE", "AWS_SESSION_TOKEN", "AWS_ENDPOINT_URL", "AWS_ENDPOINT_URL_S3", "AWS_REGION")


@contextmanager
def moto_s3() -> Iterator[S3Server]:
    """moto's S3 server on 127.0.0.1 and a free port for the duration of the block, with the
    test process's environment holding CREDENTIALS (what storage_from_settings reads, as a
    deployed process would)."""
    import pytest
    from moto.server import ThreadedMotoServer

    server = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    try:
        with pytest.MonkeyPatch.context() as env:
            for name in SCRUBBED:
                env.delenv(name, raising=False)
            for name, value in CREDENTIALS.items():
                env.setenv(name, value)
            host, port = server.get_host_and_port()
            yield S3Server(f"http://{host}:{port}")
    finally:
        server.stop()
