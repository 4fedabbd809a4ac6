"""Secrets out of everything payrace writes or says: one redaction, used everywhere.

    redact(text)          every password in free text -> ***: URL userinfo
                          (postgresql://user:secret@host), libpq key=value (password=secret),
                          query parameters (?password=secret), PGPASSWORD=secret
    redact_tree(value)    redact() applied to every string of a JSON-like value (summary.json)
    without_endpoints(text)  internal host:port out of an answer a client sees (a 502's
                          message names what failed, not where it lives)

CI uploads reports (summary.json's `command`, report.html, junit.xml) as artifacts anyone
with read access to the repository can open, so a DSN typed on the command line must not
reach them. A user's own URL is still recognisable after redaction: only the password goes.
Standard library only, like payrace.postgres, so Locust workers and the service import it
without the rest of the harness.
"""

from __future__ import annotations

import re
from typing import Any, TypeVar, cast

T = TypeVar("T")

MASK = "***"

# scheme://user:password@ — the password ends at the last character before "@" that a URL
# can hold unescaped there; "/" is excluded so http://host:8000/a@b keeps its port.
_URL_PASSWORD = re.compile(r"(\b[A-Za-z][A-Za-z0-9+.-]*://[^:/@\s'\"]*:)[^@\s/'\"]+@")
# libpq conninfo and query strings: password=secret, password='a b', PGPASSWORD=secret
_KEY_PASSWORD = re.compile(
    r"(\b(?:PG)?password\s*=\s*)('(?:[^'\\]|\\.)*'|[^\s&'\"]+)", re.IGNORECASE
)
# Where an internal service lives: a URL's authority, urllib3's host='...', port=N, and a
# socket address tuple ('127.0.0.1', 9411).
_URL_AUTHORITY = re.compile(r"\b([A-Za-z][A-Za-z0-9+.-]*://)[^/\s'\"]+")
_HOST_KW = re.compile(r"\bhost='[^']*'(?:,\s*port=\d+)?")
_ADDR_TUPLE = re.compile(r"\('[^']*',\s*\d+\)")
_HOST_PORT = re.compile(r"\b(?:\d{1,3}(?:\.\d{1,3}){3}|localhost|\[[0-9a-fA-F:]+\]):\d{1,5}\b")


def redact(text: str) -> str:
    """`text` with every password it carries replaced by ***."""
    if "://" not in text and "assword" not in text.lower():
        return text  # the common case, cheaply
    text = _URL_PASSWORD.sub(rf"\g<1>{MASK}@", text)
    return _KEY_PASSWORD.sub(rf"\g<1>{MASK}", text)


def redact_tree(value: T) -> T:
    """A copy of a JSON-like value with redact() applied to every string in it (keys too);
    anything else (numbers, objects carried along such as a run's history) is kept as is."""
    return cast(T, _tree(value))


def _tree(value: Any) -> Any:
    if isinstance(value, str):
        return redact(value)
    if isinstance(value, dict):
        return {_tree(k): _tree(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_tree(v) for v in value]
    if isinstance(value, tuple):
        return tuple(_tree(v) for v in value)
    return value


def without_endpoints(text: str) -> str:
    """`text` without the hosts and ports it names: for an error answered to a client, which
    must say what failed without mapping the network behind the service."""
    text = _URL_AUTHORITY.sub(r"\g<1><hidden>", redact(text))
    text = _HOST_KW.sub("host=<hidden>", text)
    text = _ADDR_TUPLE.sub("(<hidden>)", text)
    return _HOST_PORT.sub("<hidden>", text)
