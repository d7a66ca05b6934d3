"""Mask credentials in any URL inside a text, before it reaches a message, a log or an audit entry."""
from __future__ import annotations

import logging
import re

MASK = "***"

# scheme://user:password@host -> scheme://user:***@host (the password may hold anything but '@', '/' and blanks;
# the last '@' before the host ends it, so a password with an '@' is masked whole).
_USERINFO = re.compile(
    r"(?P<head>\b[A-Za-z][A-Za-z0-9+.\-]*://[^\s/:@'\"<>]*:)(?P<secret>[^\s/'\"<>]*)(?P<at>@)")
# scheme://token@host (userinfo without a colon, e.g. https://ghp_xxx@github.com) -> scheme://***@host
_TOKEN_USER = re.compile(r"(?P<head>\b(?:https?|git|s3|gs|az|abfss?)://)(?P<secret>[^\s/:@'\"<>]{16,})(?P<at>@)")
# ?password=... &token=... and similar query or key=value parameters
_PARAM = re.compile(
    r"(?P<head>(?:[?&;\s,(]|^)(?:[A-Za-z0-9_\-]*?)(?:password|passwd|pwd|secret|token|api[_\-]?key|access[_\-]?key"
    r"|secret[_\-]?key|sig|signature|credential|x-amz-signature|x-amz-credential|x-amz-security-token)=)"
    r"(?P<secret>[^\s&;'\"<>,)]+)", re.IGNORECASE)


def redact(text: str) -> str:
    """``text`` with every URL's password, bearer-like user token and secret query parameter masked."""
    if not text:
        return text
    text = _USERINFO.sub(lambda m: f"{m['head']}{MASK}{m['at']}" if m["secret"] else m[0], text)
    text = _TOKEN_USER.sub(lambda m: f"{m['head']}{MASK}{m['at']}", text)
    return _PARAM.sub(lambda m: f"{m['head']}{MASK}", text)


def redact_exc(exc: BaseException) -> str:
    """An exception as ``Type: message`` with credentials masked."""
    return redact(f"{type(exc).__name__}: {exc}")


def scrub(exc: BaseException) -> BaseException:
    """Mask credentials in ``exc`` and the exceptions chained to it, in place (their text and ``args``), and
    return it: a traceback printed or logged afterwards carries no password. The types stay what they were,
    so retry classification still reads the same chain."""
    seen: set[int] = set()
    error: BaseException | None = exc
    while error is not None and id(error) not in seen:
        seen.add(id(error))
        try:
            error.args = tuple(redact(a) if isinstance(a, str) else a for a in error.args)
            for name in ("message", "msg", "detail", "strerror"):
                value = getattr(error, name, None)
                if isinstance(value, str) and redact(value) != value:
                    setattr(error, name, redact(value))
        except (AttributeError, TypeError):  # an exception type with read-only fields keeps them
            pass
        error = error.__cause__ or error.__context__
    return exc


class RedactingFilter(logging.Filter):
    """A logging filter that masks credentials in every record's message (install it on handlers)."""

    def filter(self, record: logging.LogRecord) -> bool:
        message = record.getMessage()
        clean = redact(message)
        if clean != message:
            record.msg, record.args = clean, None
        if record.exc_info and record.exc_info[1] is not None:
            scrub(record.exc_info[1])
            record.exc_text = None
        return True


def install_log_filter() -> None:
    """Put a :class:`RedactingFilter` on every handler configured now (the root logger's and each named
    logger's, e.g. an orchestrator's console and API handlers); calling it again adds none twice."""
    loggers = [logging.getLogger(), *(lg for lg in logging.Logger.manager.loggerDict.values()
                                      if isinstance(lg, logging.Logger))]
    for lg in loggers:
        for handler in lg.handlers:
            if not any(isinstance(f, RedactingFilter) for f in handler.filters):
                handler.addFilter(RedactingFilter())
