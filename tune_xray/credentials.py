"""No secret written down: the passwords and tokens inside URLs (`postgresql://user:PASSWORD@host/db`,
`https://user:TOKEN@mlflow…`, `?password=…`) masked in everything a search stores or logs — search.json,
summary.json, its MLflow params, tags and artifacts, the report, Tune's pickled state, the console.

A search keeps the real URLs in this process only (`remember`); what it stores holds the masked form, and what it
uses is `reveal`ed from it. Another process — a `--resume`, `python -m tune_xray.ensemble` — gets the credentials
again from its command line (the same URL with its password) or from the environment each driver reads: PGPASSWORD
or ~/.pgpass for PostgreSQL, MLFLOW_TRACKING_USERNAME / MLFLOW_TRACKING_PASSWORD for an MLflow server, AWS_* for S3.
"""

from __future__ import annotations

import re

MASK = "***"
_USERINFO = re.compile(r"(?P<scheme>[A-Za-z][A-Za-z0-9+.\-]*://)(?P<user>[^:/@\s'\"]*):(?P<secret>[^@/\s'\"]+)@")
_QUERY = re.compile(r"(?P<key>[?&;](?:password|passwd|pwd|token|access_token|secret|secret_key|aws_secret_access_key|"
                    r"sig|signature|x-amz-signature|x-amz-security-token)=)(?P<secret>[^&\s'\"]+)", re.IGNORECASE)
_KNOWN: dict[str, str] = {}  # masked → real, this process's URLs


def mask(text):
    """`text` (any string, or a value holding strings: a dict or list is masked throughout) with every password and
    token inside a URL replaced by ***; other values as they are."""
    if isinstance(text, str):
        text = _USERINFO.sub(lambda m: f"{m['scheme']}{m['user']}:{MASK}@" if m["secret"] != MASK else m[0], text)
        return _QUERY.sub(lambda m: f"{m['key']}{MASK}", text)
    if isinstance(text, dict):
        return {k: mask(v) for k, v in text.items()}
    if isinstance(text, (list, tuple)):
        return type(text)(mask(v) for v in text)
    return text


def remember(url: str | None) -> str | None:
    """Keep `url`'s secrets in this process; returns its masked form, the one to store."""
    if url is None:
        return None
    masked = mask(url)
    if masked != url:
        _KNOWN[masked] = url
    return masked


def reveal(url: str | None) -> str | None:
    """The URL to connect with: the real one this process remembered for a masked `url`; otherwise `url` without
    the masked password (`user:***@` → `user@`), so the driver takes it from its environment (PGPASSWORD, …)."""
    if url is None or MASK not in url:
        return url
    if url in _KNOWN:
        return _KNOWN[url]
    return _QUERY.sub("", url.replace(f":{MASK}@", "@"))


def same_place(stored: str | None, given: str | None) -> bool:
    """Whether a command line's URL names what a stored (masked) one does, its secrets apart."""
    return stored is not None and given is not None and mask(given) == mask(stored)
