"""A real S3 API on 127.0.0.1 (moto's server) with s3fs pointed at it: for tests and benchmarks.

s3fs reads its endpoint from fsspec's config: ``FSSPEC_S3`` (JSON) in the environment of every
process that touches the root (workers, CLI runs), and ``fsspec.config.conf["s3"]`` in this one.
"""

from __future__ import annotations

import json
import os
from contextlib import contextmanager


def s3_settings(endpoint: str) -> dict:
    # listings are never cached: other processes write the same root
    return {"endpoint_url": endpoint, "key": "testing", "secret": "testing", "use_listings_cache": False}


@contextmanager
def moto_s3(bucket: str = "synth-ood"):
    """Start moto's server on a free port, point s3fs at it (here and in child processes), yield ``s3://bucket``."""
    import logging

    import fsspec.config
    from moto.server import ThreadedMotoServer

    logging.getLogger("werkzeug").setLevel(logging.ERROR)  # one line per request otherwise

    server = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    host, port = server.get_host_and_port()
    settings = s3_settings(f"http://{host}:{port}")
    saved = {k: os.environ.get(k) for k in ("FSSPEC_S3", "AWS_EC2_METADATA_DISABLED", "AWS_DEFAULT_REGION")}
    os.environ["AWS_DEFAULT_REGION"] = "us-east-1"
    os.environ["FSSPEC_S3"] = json.dumps(settings)
    os.environ["AWS_EC2_METADATA_DISABLED"] = "true"
    saved_conf = fsspec.config.conf.get("s3")
    fsspec.config.conf["s3"] = settings
    try:
        import s3fs

        s3fs.S3FileSystem.clear_instance_cache()
        s3fs.S3FileSystem().mkdir(bucket)  # region from AWS_DEFAULT_REGION
        yield f"s3://{bucket}"
    finally:
        server.stop()
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v
        if saved_conf is None:
            fsspec.config.conf.pop("s3", None)
        else:
            fsspec.config.conf["s3"] = saved_conf
