"""The one error type users see: a single line naming what is wrong and how to fix it."""

from __future__ import annotations

import re


class BstuneError(Exception):
    """Bad input or an unusable environment. The CLI prints it as one line and exits with code 2."""


_PASSWORD = re.compile(r"(?P<head>[a-zA-Z][a-zA-Z0-9+.-]*://[^/:@\s]*:)(?P<pw>[^@/\s]*)(?P<tail>@)")


def redact(text: str) -> str:
    """Hide passwords in URLs (``postgresql://user:secret@host`` -> ``postgresql://user:***@host``)."""
    return _PASSWORD.sub(lambda m: f"{m['head']}***{m['tail']}", text)
