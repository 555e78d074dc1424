"""Shared test set-up: offline, temporary Prefect home and result storage, tiny models built once."""

from __future__ import annotations

import os
import tempfile

_PREFECT_TMP = tempfile.mkdtemp(prefix="synth-ood-prefect-")
# set before anything imports prefect or transformers
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ["PREFECT_HOME"] = os.path.join(_PREFECT_TMP, "home")
os.environ["PREFECT_RESULTS_LOCAL_STORAGE_PATH"] = os.path.join(_PREFECT_TMP, "results")
os.environ.pop("PREFECT_API_URL", None)
os.environ["PREFECT_SERVER_ANALYTICS_ENABLED"] = "false"
# a fresh PREFECT_HOME means the local API creates its database first: slow on a busy 2-core machine
os.environ.setdefault("PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS", "300")

import sys  # noqa: E402
from pathlib import Path  # noqa: E402

import pytest  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # `benchmarks` helpers


@pytest.fixture(scope="session")
def s3_bucket():
    """``s3://synth-ood`` on moto's S3 server on 127.0.0.1; child processes inherit the endpoint (FSSPEC_S3)."""
    from benchmarks.moto_s3 import moto_s3

    with moto_s3("synth-ood") as root:
        yield root


@pytest.fixture
def one_row_stage():
    """A stage ``one-row`` of 6 one-row shards (registered for the test only)."""
    from ood_core.stages.base import STAGES, ShardOutput, ShardPlan, Stage, row
    from schemas import SKETCH

    class OneRow(Stage):
        name, schema = "one-row", SKETCH

        def config_slice(self, cfg):
            return {}

        def plan(self, ctx):
            return [ShardPlan(i, [{"key": f"s{i}"}]) for i in range(6)]

        def run_shard(self, ctx, shard):
            out = ShardOutput()
            out.add(row(shard.items[0]["key"], "kept", "ok", kind="far"), {"txt": b"x"})
            return out

    STAGES.register("one-row", OneRow)
    yield "one-row"
    STAGES._items.pop("one-row")
