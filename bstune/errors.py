"""The one error type users see: a single line naming what is wrong and how to fix it."""

from __future__ import annotations

import contextlib
import os
import re
from collections.abc import Iterator
from pathlib import Path


class BstuneError(Exception):
    """Bad input or an unusable environment. The CLI prints it as one line and exits with code 2."""


# A URL in running text: a scheme, then everything up to whitespace or a quote (a password may hold any other
# character, '/', '?', ':' and '@' included, percent-encoded or not).
_URL = re.compile(r"""[a-zA-Z][a-zA-Z0-9+.-]*://[^\s'"`<>]+""")
# A secret given as a key=value pair: in a URL's query (?password=..., &sslpassword=...) or a libpq DSN.
_SECRET_PARAM = re.compile(r"""(?i)(?P<key>\b[a-z_]*(?:password|passwd|pwd|secret|token))(?P<eq>\s*=\s*)"""
                           r"""(?P<value>'[^']*'|"[^"]*"|[^&;\s'"`<>]+)""")
MASK = "***"


def _redact_url(url: str) -> str:
    scheme, rest = url.split("://", 1)
    # The userinfo runs to the last '@' before the query (a password may hold '@' and '?' unencoded, a query
    # value may hold '@'); a URL with no authority (sqlite:////path@x, file:///...) has none.
    query = rest.find("?", rest.find("@") + 1)
    at = rest.rfind("@", 0, query if query >= 0 else len(rest))
    if at > 0 and not rest.startswith("/"):
        user, colon, _ = rest[:at].partition(":")
        if colon:
            rest = f"{user}:{MASK}{rest[at:]}"
    return f"{scheme}://{rest}"


def redact(text: str) -> str:
    """Hide every password in ``text``: in each URL's userinfo (``postgresql://u:secret@host`` ->
    ``postgresql://u:***@host``, whatever characters the password holds) and in every secret key=value pair
    (``?password=...``, ``&sslpassword=...``, a DSN's ``password=...``). Safe on any text: an error message
    quoting several URLs, a spec, a single URL."""
    text = _URL.sub(lambda m: _redact_url(m[0]), text)
    return _SECRET_PARAM.sub(lambda m: f"{m['key']}{m['eq']}{MASK}", text)


_OS_REASON = re.compile(r"\[Errno -?\d+\] ([^'\")\]]+(?:'[^']*')?)")


def first_line(e: BaseException, limit: int = 200) -> str:
    """What to quote of an exception in a one-line error: its (driver's) message's first line, without
    passwords, cut at a word within ``limit`` characters; its type's name when it has no message. Where that
    line is too long because it buries an OS error under retries and pool objects (HTTP clients do), the OS
    error's reason. Optuna's "an exception is raised during the commit" says nothing of why: its cause does."""
    while type(e).__name__ == "StorageInternalError" and e.__cause__ is not None:
        e = e.__cause__
    text = str(getattr(e, "orig", None) or e).strip()
    line = redact(text.splitlines()[0] if text else type(e).__name__)
    if len(line) <= limit:
        return line
    if m := _OS_REASON.search(line):
        return m[1].strip()
    return line[: limit + 1].rsplit(" ", 1)[0] + " ..."


@contextlib.contextmanager
def writing(path: str | Path) -> Iterator[None]:
    """Around writing an output file or folder: an OS error (a full disk, a read-only file system, no
    permission) becomes one line naming the file and the cause."""
    try:
        yield
    except OSError as e:
        where = e.filename or path
        raise BstuneError(f"{where}: cannot write it ({e.strerror or first_line(e)}); free space or give a "
                          "writable place") from None


def write_output(path: str | Path, data: str | bytes) -> None:
    """Write an output file whole or not at all: into a temporary file beside it, then renamed over it, so a
    full disk leaves no half-written file; its folders are made. One line on failure (`writing`)."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    with writing(path):
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            with open(tmp, "wb") as f:
                f.write(data.encode() if isinstance(data, str) else data)
            os.replace(tmp, path)
        finally:
            with contextlib.suppress(OSError):
                tmp.unlink(missing_ok=True)
