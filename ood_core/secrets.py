"""Secrets never reach disk or logs: API keys are resolved at run time and scrubbed from texts.

Keys come from an environment variable or a named secret store (a Prefect Secret block, registered
by ``tasks/`` with :func:`set_secret_resolver`, since ``ood_core`` never imports Prefect). Every
resolved key is remembered in this process, and :func:`scrub` removes it, ``Authorization`` /
``api-key`` header values and URL credentials from any text before it is stored or logged.
"""

from __future__ import annotations

import os
import re
import threading
from collections.abc import Callable
from typing import Any
from urllib.parse import urlsplit, urlunsplit

REDACTED = "***"

_KNOWN: set[str] = set()
_LOCK = threading.Lock()
_RESOLVER: Callable[[str], str] | None = None

# header-like "name: value" / "name=value" / JSON "name": "value" forms of credential fields
_HEADER_VALUE = re.compile(
    r"""(?ix)
    (["']?(?:authorization|proxy-authorization|x-api-key|api[-_]?key|openai[-_]api[-_]key|access[-_]token)["']?
     \s*[:=]\s*["']?)
    (?:(?:bearer|basic|token)\s+)?
    [^\s"',;}&]+
    """
)
_BEARER = re.compile(r"(?i)\b(bearer|basic)\s+[A-Za-z0-9._~+/=-]{6,}")
_URL_USERINFO = re.compile(r"(?i)\b([a-z][a-z0-9+.-]*://)[^/\s@:]*(?::[^/\s@]*)?@")


class SecretError(ValueError):
    """A configured secret could not be resolved; the message says where it was looked for."""


def remember(value: str | None) -> None:
    """Treat ``value`` as a secret from now on (scrubbed from every text); short values are ignored."""
    if value and len(value) >= 4:
        with _LOCK:
            _KNOWN.add(value)


def set_secret_resolver(fn: Callable[[str], str] | None) -> None:
    """Install the lookup for named secrets (``tasks/`` installs one that reads Prefect Secret blocks)."""
    global _RESOLVER
    _RESOLVER = fn


def has_secret_resolver() -> bool:
    """Whether named secrets can be read in this process (under the Prefect runner)."""
    return _RESOLVER is not None


def resolve_api_key(env_var: str | None, secret_name: str | None = None) -> str | None:
    """The API key from secret ``secret_name`` (if set) or environment variable ``env_var``."""
    if secret_name:
        if _RESOLVER is None:
            raise SecretError(
                f"models.endpoint.api_key_secret={secret_name!r} needs the Prefect runner (a Secret block); "
                f"without Prefect put the key in the environment variable named by models.mllm.api_key_env"
            )
        try:
            key = _RESOLVER(secret_name)
        except Exception as err:  # noqa: BLE001 - any lookup failure gets one clear message
            raise SecretError(f"could not read the secret {secret_name!r}: {type(err).__name__}") from None
    else:
        key = os.environ.get(env_var) if env_var else None
    remember(key)
    return key or None


def split_url_credentials(url: str) -> tuple[str, tuple[str, str] | None]:
    """``http://u:p@host/v1`` -> (``http://host/v1``, (u, p)); URLs without credentials pass through."""
    parts = urlsplit(url)
    if parts.username is None and parts.password is None:
        return url, None
    host = parts.hostname or ""
    if parts.port:
        host = f"{host}:{parts.port}"
    remember(parts.password)
    return urlunsplit((parts.scheme, host, parts.path, parts.query, parts.fragment)), (
        parts.username or "",
        parts.password or "",
    )


def scrub(text: str, known_only: bool = False) -> str:
    """``text`` without known secrets, credential header values and URL credentials.

    ``known_only`` removes only the secrets resolved in this process (for model replies, whose
    wording should otherwise stay as it is).
    """
    if not text:
        return text
    with _LOCK:
        known = sorted(_KNOWN, key=len, reverse=True)
    for value in known:
        if value in text:
            text = text.replace(value, REDACTED)
    if known_only:
        return text
    text = _URL_USERINFO.sub(lambda m: m.group(1) + REDACTED + "@", text)
    text = _HEADER_VALUE.sub(lambda m: m.group(1) + REDACTED, text)
    return _BEARER.sub(lambda m: m.group(1) + " " + REDACTED, text)


def scrub_tree(obj: Any) -> Any:
    """:func:`scrub` every string inside nested dicts/lists/tuples (configs, records)."""
    if isinstance(obj, str):
        return scrub(obj)
    if isinstance(obj, dict):
        return {k: scrub_tree(v) for k, v in obj.items()}
    if isinstance(obj, list | tuple):
        return type(obj)(scrub_tree(v) for v in obj)
    return obj
