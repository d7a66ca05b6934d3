"""Mask credentials in any URL inside a text, before it reaches a message, a log or an audit entry."""
from __future__ import annotations

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
