"""The one error type users see: a single line naming what is wrong and how to fix it."""

from __future__ import annotations

import re


class BstuneError(Exception):
    """Bad input or an unusable environment. The CLI prints it as one line and exits with code 2."""


_PASSWORD = re.compile(r"(?P<head>[a-zA-Z][a-zA-Z0-9+.-]*://[^/:@\s]*:)(?P<pw>[^@/\s]*)(?P<tail>@)")


def redact(text: str) -> str:
    """Hide passwords in URLs (``postgresql://user:secret@host`` -> ``postgresql://user:***@host``)."""
    return _PASSWORD.sub(lambda m: f"{m['head']}***{m['tail']}", text)


_OS_REASON = re.compile(r"\[Errno -?\d+\] ([^'\")\]]+(?:'[^']*')?)")


def first_line(e: BaseException, limit: int = 200) -> str:
    """What to quote of an exception in a one-line error: its (driver's) message's first line, without
    passwords, cut at a word within ``limit`` characters; its type's name when it has no message. Where that
    line is too long because it buries an OS error under retries and pool objects (HTTP clients do), the OS
    error's reason."""
    text = str(getattr(e, "orig", None) or e).strip()
    line = redact(text.splitlines()[0] if text else type(e).__name__)
    if len(line) <= limit:
        return line
    if m := _OS_REASON.search(line):
        return m[1].strip()
    return line[: limit + 1].rsplit(" ", 1)[0] + " ..."
