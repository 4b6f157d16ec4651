"""No secret written down: the passwords and tokens inside URLs (`postgresql://user:PASSWORD@host/db`,
`https://TOKEN@mlflow…`, `?sslpassword=…`, an S3 presigned `X-Amz-Signature`) masked in everything a search stores or
logs — search.json, summary.json, its MLflow params, tags and artifacts, the report, Tune's pickled state, the
console.

URLs are parsed, not pattern-matched: a database URL as SQLAlchemy reads it (`make_url`: the password may hold `/`,
spaces, quotes; an unencoded `@` in it is taken up to the last `@` before the query, so no part of it shows), any
other as `urllib.parse` does (RFC 3986: a user without a password is a token, as `https://TOKEN@host` is for GitHub,
GitLab and Hugging Face). Query parameters named like secrets (SECRET_PARAMETERS, any case) are masked too. The masked
URL keeps its shape — only the secrets become ***, nothing is re-encoded or reordered — and a masked URL is masked
again unchanged.

A search keeps the real URLs in this process only (`remember`); what it stores holds the masked form, and what it
uses is `reveal`ed from it: exactly the URL it was given. Another process — a `--resume`, `python -m
tune_xray.ensemble` — gets the credentials again from its command line (the same URL with its password) or from the
environment each driver reads: PGPASSWORD or ~/.pgpass for PostgreSQL, MLFLOW_TRACKING_USERNAME /
MLFLOW_TRACKING_PASSWORD or MLFLOW_TRACKING_TOKEN for an MLflow server, AWS_* for S3.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from urllib.parse import unquote_plus, urlsplit

MASK = "***"
# query parameters whose value is a secret (compared case-insensitively, after percent-decoding the name)
SECRET_PARAMETERS = frozenset({"password", "passwd", "pwd", "sslpassword", "token", "access_token", "api_key", "apikey",
                               "key", "secret", "signature", "sig", "x-amz-signature", "x-amz-credential",
                               "x-amz-security-token"})
# the SQLAlchemy dialects a URL's scheme may name (`postgresql+psycopg://`): parsed as SQLAlchemy parses them
DATABASES = frozenset({"postgresql", "postgres", "mysql", "mariadb", "sqlite", "oracle", "mssql", "cockroachdb"})
_SCHEME = re.compile(r"[A-Za-z][A-Za-z0-9+.\-]*://")  # where a URL with an authority begins (RFC 3986 §3.1)
_TOKEN_END = re.compile(r"[\s'\"<>]")  # where a URL inside running text ends
_KNOWN: dict[str, str] = {}  # masked → real, this process's URLs


@dataclass(frozen=True)
class _Url:
    """A URL cut where its secrets are, every piece its own text as written: `head` (scheme://), `user`, `password`
    (None: no `:` in the userinfo; `user` None: no userinfo), `middle` (host, port, path), `query` (None: no `?`),
    `tail` (`#fragment`, or nothing)."""

    head: str
    user: str | None
    password: str | None
    middle: str
    query: str | None
    tail: str
    database: bool

    def text(self) -> str:
        userinfo = ""
        if self.user is not None:
            userinfo = self.user + ("" if self.password is None else ":" + self.password) + "@"
        query = "" if self.query is None else "?" + self.query
        return f"{self.head}{userinfo}{self.middle}{query}{self.tail}"


def _split(url: str) -> _Url | None:
    """`url` cut into its pieces (None: not a URL with an authority — a plain path, `file:x`, text)."""
    start = _SCHEME.match(url)
    if start is None:
        return None
    head, rest = url[:start.end()], url[start.end():]
    if head[:-3].split("+")[0].lower() in DATABASES:
        return _split_database(head, rest)
    return _split_web(head, url, rest)


def _split_database(head: str, rest: str) -> _Url:
    """As SQLAlchemy's `make_url` reads a database URL: a user name runs to the first `:` or `/` (back to its last
    `@` where no password follows); a password from that `:` to the `@` before the host — and, where it holds
    unencoded `@`s itself, to the last one before the query (SQLAlchemy would take the first and connect to a host
    named by the rest of the password: none of it is shown here); the query is everything after the next `?`.
    What SQLAlchemy itself reads as the password is checked to lie inside the part masked (else all before the last
    `@` is taken for it)."""
    from sqlalchemy.engine import make_url

    whole = rest
    name = re.match(r"[^:/]*", rest)[0]
    user = password = None
    after = rest[len(name):]
    if after.startswith(":") and "@" in after:
        first = after.index("@")
        question = after.find("?", first)
        last = after.rindex("@", first, question if question >= 0 else len(after))
        user, password, rest = name, after[1:last], after[last + 1:]
    elif "@" in name:
        user, rest = name[:name.rindex("@")], rest[name.rindex("@") + 1:]
    middle, question, query = rest.partition("?")
    parsed = _Url(head, user, password, middle, query if question else None, "", True)
    try:
        known = make_url(parsed.text()).password
    except Exception:  # noqa: BLE001 — not a URL SQLAlchemy can read: nothing it would send
        known = None
    if known and not (password is not None and unquote_plus(password).startswith(known)):  # (not seen: tested)
        at = whole.rindex("@")  # read otherwise than here: all before the last `@` is the password, to be safe
        middle, question, query = whole[at + 1:].partition("?")
        parsed = _Url(head, "", whole[:at], middle, query if question else None, "", True)
    return parsed


def _split_web(head: str, url: str, rest: str) -> _Url:
    """As `urllib.parse.urlsplit` reads a URL: the userinfo is the authority up to its last `@`."""
    parts = urlsplit(url)
    authority, after = rest[:len(parts.netloc)], rest[len(parts.netloc):]
    user = password = None
    if "@" in authority:
        userinfo, _, authority = authority.rpartition("@")
        user, colon, password = userinfo.partition(":")
        password = password if colon else None
    path_and_query, hash_, fragment = after.partition("#")
    path, question, query = path_and_query.partition("?")
    return _Url(head, user, password, authority + path, query if question else None, hash_ + fragment, False)


def _masked_query(query: str) -> str:
    """`a=1&password=x;sig=y` → `a=1&password=***;sig=***`: each secret parameter's value masked, separators kept."""
    pieces = re.split(r"([&;])", query)
    for i, piece in enumerate(pieces):
        name, equals, value = piece.partition("=")
        if equals and value and unquote_plus(name).strip().lower() in SECRET_PARAMETERS:
            pieces[i] = f"{name}={MASK}"
    return "".join(pieces)


def mask_url(url: str) -> str:
    """One URL with its password, a user that is a token (no password beside it; not a database's user name) and
    every secret query parameter masked; anything else — a path, a URL with no secret — exactly as given."""
    parsed = _split(url)
    if parsed is None:
        return url
    user, password = parsed.user, parsed.password
    if password:
        password = MASK
    elif user and password is None and not parsed.database:
        user = MASK  # https://TOKEN@host
    query = None if parsed.query is None else _masked_query(parsed.query)
    masked = _Url(parsed.head, user, password, parsed.middle, query, parsed.tail, parsed.database)
    return url if masked == parsed else masked.text()


def _mask_text(text: str) -> str:
    """A URL (all of `text`, past any blanks), or running text with URLs in it (each to the next blank or quote;
    a URL this process remembered found whole, its secrets however written)."""
    for masked, real in _KNOWN.items():
        text = text.replace(real, masked)
    stripped = text.strip()
    if _SCHEME.match(stripped):
        return text.replace(stripped, mask_url(stripped))
    out, end = [], 0
    for start in _SCHEME.finditer(text):
        if start.start() < end:
            continue  # inside the URL before (its query, say)
        stop = _TOKEN_END.search(text, start.start())
        stop = len(text) if stop is None else stop.start()
        out += [text[end:start.start()], mask_url(text[start.start():stop])]
        end = stop
    return "".join(out) + text[end:]


def mask(value):
    """`value` (a string, or a dict, list or tuple of them, masked throughout) with every password, token and
    secret query parameter inside a URL masked; other values as they are."""
    if isinstance(value, str):
        return _mask_text(value)
    if isinstance(value, dict):
        return {k: mask(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return type(value)(mask(v) for v in value)
    return value


def mask_argv(argv: list[str]) -> list[str]:
    """A command line's words masked one by one (`--flag=URL` too), so a quoted password with blanks in it is masked
    whole before the words are joined."""
    words = []
    for word in argv:
        flag, equals, value = word.partition("=")
        words.append(f"{flag}={mask_url(value)}" if word.startswith("-") and equals else mask_url(word))
    return words


def remember(url: str | None) -> str | None:
    """Keep `url`'s secrets in this process; returns its masked form, the one to store."""
    if url is None:
        return None
    masked = mask_url(url)
    if masked != url:
        _KNOWN[masked] = url
    return masked


def reveal(url: str | None) -> str | None:
    """The URL to connect with: exactly the real one this process remembered for a masked `url`; otherwise `url`
    without what was masked (`user:***@` → `user@`, a masked token and its `@` dropped, a masked query parameter
    dropped and the query kept well-formed), so the driver takes the secrets from its environment (PGPASSWORD, …)."""
    if url is None or MASK not in url:
        return url
    if url in _KNOWN:
        return _KNOWN[url]
    parsed = _split(url)
    if parsed is None:
        return url
    user, password = parsed.user, parsed.password
    if password == MASK:
        password = None
    if user == MASK and password is None:
        user = None
    query = parsed.query
    if query is not None:
        kept = [p for p in re.split(r"[&;]", query) if p.partition("=")[2] != MASK]
        query = "&".join(kept) if kept else None
    return _Url(parsed.head, user, password, parsed.middle, query, parsed.tail, parsed.database).text()


def same_place(stored: str | None, given: str | None) -> bool:
    """Whether a command line's URL names what a stored (masked) one does, its secrets apart."""
    return stored is not None and given is not None and mask(given) == mask(stored)
