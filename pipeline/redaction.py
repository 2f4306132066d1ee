"""Secrets hidden in what we print and log: URI passwords and tokens, secret parameters.

Everything that reaches a console line, MLflow, a manifest or a job spec goes through
:func:`redact`; the workers get the real values."""

from __future__ import annotations

import re
from typing import Any

# scheme://user:password@host (the password may hold a raw "/"): the password is hidden.
_USER_PASSWORD = re.compile(r"(?P<scheme>[a-zA-Z][a-zA-Z0-9+.-]*://)(?P<user>[^:/?#@\s,]*):(?P<pw>[^\s,]*)@")
# scheme://token@host, userinfo without a colon: in practice a token (https://ghp_...@github.com),
# so all of it is hidden; a user name alone is little to lose.
_USER_ONLY = re.compile(r"(?P<scheme>[a-zA-Z][a-zA-Z0-9+.-]*://)[^:/?#@\s,]+@")
# A query-string or key=value secret: a parameter whose name is, or ends in, one of these
# words (token, access_token, X-Amz-Signature, sig, api_key, client_secret, ...).
_SECRET_PARAM = re.compile(
    r"(?i)(?P<name>(?:^|(?<=[?&;\s]))(?:[\w.-]*[_.-])?"
    r"(?:token|secret|password|passwd|pwd|signature|sig|key|apikey|credential|auth)=)"
    r"[^&;#\s]*"
)


def redact(value: Any) -> Any:
    """Hide secrets in a string: the password of ``scheme://user:password@host`` (-> ``user:***@``),
    a userinfo without a password (``https://TOKEN@host`` -> ``https://***@host``) and
    secret-looking parameters (``?token=``, ``X-Amz-Signature=``, ``sig=``, ``password=``,
    ``api_key=``, ... -> ``=***``). Anything that is not a string comes back as it is."""
    if not isinstance(value, str):
        return value
    value = _USER_PASSWORD.sub(r"\g<scheme>\g<user>:***@", value)
    value = _USER_ONLY.sub(r"\g<scheme>***@", value)
    return _SECRET_PARAM.sub(r"\g<name>***", value)
