"""The local Prefect API gets a start-up timeout that fits a slow machine; the environment can override it."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

from flows.local_api import STARTUP_TIMEOUT_ENV, STARTUP_TIMEOUT_SECONDS, local_api_notice

PROBE = (
    "import flows.synth_ood\n"
    "from prefect.settings import get_current_settings\n"
    "print(get_current_settings().server.ephemeral.startup_timeout_seconds)\n"
)


def _timeout_seen_by_prefect(env_value: str | None) -> int:
    env = {k: v for k, v in os.environ.items() if k != STARTUP_TIMEOUT_ENV}
    if env_value is not None:
        env[STARTUP_TIMEOUT_ENV] = env_value
    proc = subprocess.run([sys.executable, "-c", PROBE], env=env, capture_output=True, text=True, check=True)
    return int(proc.stdout.strip().splitlines()[-1])


def test_flow_module_sets_a_startup_timeout_longer_than_prefects_default():
    assert STARTUP_TIMEOUT_SECONDS > 20
    assert _timeout_seen_by_prefect(None) == STARTUP_TIMEOUT_SECONDS


def test_user_value_from_the_environment_wins():
    assert _timeout_seen_by_prefect("45") == 45


@pytest.mark.parametrize("has_db", [False, True])
def test_notice_says_when_the_first_start_sets_up_the_database(tmp_path, monkeypatch, has_db):
    monkeypatch.setenv("PREFECT_HOME", str(tmp_path))
    monkeypatch.setenv(STARTUP_TIMEOUT_ENV, "300")
    if has_db:
        (tmp_path / "prefect.db").write_bytes(b"")
    line = local_api_notice()
    assert "\n" not in line and "starting Prefect's local API" in line and "300 s" in line
    assert ("setting up Prefect's database" in line) is not has_db
