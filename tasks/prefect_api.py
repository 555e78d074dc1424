"""Calls to the Prefect API from a flow: retried with backoff on a transient error, named when they fail."""

from __future__ import annotations

import time


def _transient(err: BaseException) -> bool:
    """A dropped connection, a timeout, a 5xx or a 429 from the Prefect API: worth asking again."""
    import httpx

    if isinstance(err, httpx.TransportError):
        return True
    return isinstance(err, httpx.HTTPStatusError) and (err.response.status_code >= 500 or err.response.status_code == 429)


def api_call(what: str, fn, *args, attempts: int = 5, backoff: float = 1.0, log=print, **kwargs):
    """``fn(*args, **kwargs)``, a Prefect API call, retried with exponential backoff on a transient
    error; when it keeps failing (or fails for good), the error names ``what``."""
    for attempt in range(1, attempts + 1):
        try:
            return fn(*args, **kwargs)
        except Exception as err:  # noqa: BLE001 - classified right below
            if not _transient(err) or attempt == attempts:
                raise RuntimeError(f"Prefect API call failed: {what}: {type(err).__name__}: {err}"
                                   f"{f' (after {attempt} attempts)' if attempt > 1 else ''}. Check that the "
                                   f"Prefect API is reachable (PREFECT_API_URL); finished shards are kept: run "
                                   f"the deployment again") from err  # fmt: skip
            delay = backoff * 2 ** (attempt - 1)
            log(f"Prefect API call failed ({what}: {type(err).__name__}: {err}); retrying in {delay:.0f}s "
                f"(attempt {attempt} of {attempts})")
            time.sleep(delay)
    raise AssertionError("unreachable")
