"""Settings for Prefect's local (ephemeral) API, applied before Prefect is imported.

The first start of the local API creates and migrates its SQLite database in ``PREFECT_HOME``;
on a busy 2-core machine that alone took over 20 s, Prefect's default start-up timeout.
"""

from __future__ import annotations

import os

STARTUP_TIMEOUT_ENV = "PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS"
# generous: it only bounds how long a broken start takes to report itself
STARTUP_TIMEOUT_SECONDS = 300


def uses_local_api() -> bool:
    """True when no Prefect server is configured, so Prefect starts its own local API."""
    return not os.environ.get("PREFECT_API_URL")


def configure_local_api() -> None:
    """Default a start-up timeout that fits a slow machine; a value already in the environment wins."""
    os.environ.setdefault(STARTUP_TIMEOUT_ENV, str(STARTUP_TIMEOUT_SECONDS))
    # the local API would otherwise try to send telemetry from a machine that may be offline
    os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")


def local_api_notice() -> str:
    """The one line a user sees while the local API starts (its first start sets up the database)."""
    home = os.environ.get("PREFECT_HOME", "~/.prefect")
    first = not os.path.exists(os.path.join(os.path.expanduser(home), "prefect.db"))
    what = "first start: setting up Prefect's database in " + home + ", " if first else ""
    return (
        f"synth-ood: starting Prefect's local API ({what}up to {os.environ[STARTUP_TIMEOUT_ENV]} s; "
        f"set PREFECT_API_URL to use a running server)"
    )
