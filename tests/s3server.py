"""A real S3-compatible server for the tests: moto's server mode on 127.0.0.1, started by the test session itself.

No external service and no credentials: CI (`.ci/run`) needs nothing but the `test` extra. The fixture exports the
standard AWS variables (endpoint included) into `os.environ`, so the library finds the server the way a user's
program finds real S3, and `featstore` CLI subprocesses inherit it. Import the fixtures into conftest.py with:

    from s3server import s3_bucket, s3_url  # noqa: F401
"""
from __future__ import annotations

import logging
import os
import urllib.request
import uuid
from collections.abc import Iterator

import pytest

BUCKET = "featstore-test"
REGION = "us-east-1"


@pytest.fixture(scope="session")
def s3_bucket(tmp_path_factory) -> Iterator[str]:
    """'s3://featstore-test' on a moto server in a thread of this process, with the AWS_* variables pointing at it.

    The variables stay set for the rest of the session (and for subprocesses); ~/.aws, profiles and proxies are
    masked so a developer's own AWS setup can neither leak in nor receive test traffic.
    """
    from moto.server import ThreadedMotoServer

    logging.getLogger("werkzeug").setLevel(logging.WARNING)  # one INFO line per request otherwise
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)  # port 0: a free one
    server.start()
    host, port = server.get_host_and_port()
    endpoint = f"http://{host}:{port}"
    nowhere = str(tmp_path_factory.mktemp("aws") / "none")
    with pytest.MonkeyPatch.context() as mp:
        for name in ("AWS_PROFILE", "AWS_DEFAULT_PROFILE", "AWS_SESSION_TOKEN", "AWS_SECURITY_TOKEN"):
            mp.delenv(name, raising=False)
        env = {
            "AWS_ACCESS_KEY_ID": "testing",
            "AWS_SECRET_ACCESS_KEY": "testing",
            "AWS_DEFAULT_REGION": REGION,
            "AWS_REGION": REGION,
            "AWS_ENDPOINT_URL": endpoint,
            "AWS_CONFIG_FILE": nowhere,
            "AWS_SHARED_CREDENTIALS_FILE": nowhere,
            "AWS_EC2_METADATA_DISABLED": "true",
        }
        for name, value in env.items():
            mp.setenv(name, value)
        for name in ("NO_PROXY", "no_proxy"):  # an HTTP(S)_PROXY must not swallow requests to 127.0.0.1
            mp.setenv(name, ",".join(filter(None, [os.environ.get(name), "127.0.0.1", "localhost"])))
        # a plain HTTP PUT creates the bucket (moto checks no signature): no boto3 client to build, ~0.3 s saved
        urllib.request.urlopen(urllib.request.Request(f"{endpoint}/{BUCKET}", method="PUT"), timeout=30).close()
        try:
            yield f"s3://{BUCKET}"
        finally:
            server.stop()


@pytest.fixture
def s3_url(s3_bucket, request) -> str:
    """A fresh store URL for one test, e.g. 's3://featstore-test/test_extract-1a2b3c4d.zarr' (nothing there yet)."""
    name = "".join(c if c.isalnum() or c in "-_" else "-" for c in request.node.name)[:60]
    return f"{s3_bucket}/{name}-{uuid.uuid4().hex[:8]}.zarr"


def s3_keys(url: str) -> list[str]:
    """All object keys under an s3:// URL (relative to it, sorted): for object counts and for comparing stores."""
    import boto3

    bucket, _, prefix = url.removeprefix("s3://").partition("/")
    prefix = prefix.rstrip("/") + "/" if prefix else ""
    pages = boto3.client("s3").get_paginator("list_objects_v2").paginate(Bucket=bucket, Prefix=prefix)
    return sorted(o["Key"][len(prefix):] for page in pages for o in page.get("Contents", []))
