"""An S3-compatible server on 127.0.0.1 for tests: moto's server (`moto[s3]`, with Flask), in a
process of its own, on a free loopback port (imported by test modules; not a test itself).

Clients find it the way they find any S3 endpoint, through the AWS SDK's environment, which
pyarrow (Ray Train's and Tune's storage, `nanovlm.storage`) and boto3 both read, and which every
Ray process inherits from the process that starts the cluster:

    AWS_ENDPOINT_URL=http://127.0.0.1:<port>   AWS_ACCESS_KEY_ID / AWS_SECRET_ACCESS_KEY (any value)
    AWS_DEFAULT_REGION=us-east-1               AWS_EC2_METADATA_DISABLED=true (no instance lookup)
"""

from __future__ import annotations

import contextlib
import os
import socket
import subprocess
import sys
import time
from typing import Iterator

LOOPBACK = "127.0.0.1"


def _free_port() -> int:
    with socket.socket() as probe:
        probe.bind((LOOPBACK, 0))
        return probe.getsockname()[1]


@contextlib.contextmanager
def s3_server(*buckets: str) -> Iterator[dict[str, str]]:
    """Run the server with `buckets` created; yields the environment that points clients at it
    (also set in os.environ meanwhile, and restored afterwards)."""
    port = _free_port()
    server = subprocess.Popen([sys.executable, "-m", "moto.server", "-H", LOOPBACK, "-p", str(port)],
                              stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    env = {"AWS_ENDPOINT_URL": f"http://{LOOPBACK}:{port}", "AWS_ACCESS_KEY_ID": "testing",
           "AWS_SECRET_ACCESS_KEY": "testing", "AWS_DEFAULT_REGION": "us-east-1",
           "AWS_EC2_METADATA_DISABLED": "true"}
    saved = {key: os.environ.get(key) for key in env}
    os.environ.update(env)
    try:
        deadline = time.monotonic() + 60
        while True:
            try:
                socket.create_connection((LOOPBACK, port), timeout=1).close()
                break
            except OSError:
                if server.poll() is not None or time.monotonic() > deadline:
                    raise RuntimeError(f"moto's S3 server did not start on port {port}") from None
                time.sleep(0.2)
        import boto3

        client = boto3.client("s3")
        for bucket in buckets:
            client.create_bucket(Bucket=bucket)
        yield env
    finally:
        server.terminate()
        try:
            server.wait(timeout=10)
        except subprocess.TimeoutExpired:
            server.kill()
            server.wait()
        for key, value in saved.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value


def s3_keys(prefix_uri: str) -> list[str]:
    """Every object key under an s3:// URI, through boto3 (a client independent of pyarrow)."""
    import boto3

    bucket, _, prefix = prefix_uri[len("s3://"):].partition("/")
    paginator = boto3.client("s3").get_paginator("list_objects_v2")
    return sorted(item["Key"] for page in paginator.paginate(Bucket=bucket, Prefix=prefix)
                  for item in page.get("Contents", []))
