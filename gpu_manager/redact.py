"""Credentials out of text bound for clients and logs: `redis://:secret@host` -> `redis://***@host`.

A Redis URL may carry its password (`redis://:pw@host`, `redis://user:pw@host`,
`?password=pw`); error messages, `/ready` and log lines are read by people and clients who
must not learn it. Over-redacting a harmless `user@` is fine; leaking a password is not.
"""

from __future__ import annotations

import re
from typing import Any

# scheme://, then everything up to the *last* `@` before the path: a raw `@` in a password
# (which redis-py accepts) must not leave the tail of the password behind.
_USERINFO = re.compile(r"(?P<scheme>\b[a-zA-Z][a-zA-Z0-9+.-]*://)[^/\s'\"<>]*@")
# redis-py also reads the password from the query string.
_QUERY_PASSWORD = re.compile(r"(?P<key>[?&](?:password|passwd|pwd|token|api_key|apikey|key|"
                             r"secret|access_token)=)[^&\s'\"<>#]*",
                             re.IGNORECASE)


def redact_url(text: str) -> str:
    """`text` with the credentials of every URL in it replaced by `***`."""
    text = _USERINFO.sub(r"\g<scheme>***@", text)
    return _QUERY_PASSWORD.sub(r"\g<key>***", text)


def redact_value(value: Any) -> Any:
    """`redact_url` applied to every string in a JSON-like value (dicts, lists, strings)."""
    if isinstance(value, str):
        return redact_url(value)
    if isinstance(value, dict):
        return {k: redact_value(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [redact_value(v) for v in value]
    return value
