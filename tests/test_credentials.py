"""Secrets in URLs, by parsing: each hostile URL masked with nothing of its secret left, its shape kept, masked again
unchanged, revealed exactly in the process that remembered it and well-formed without its secrets in another."""

import shlex

import pytest
from sqlalchemy.engine import make_url

from tune_xray import credentials
from tune_xray.credentials import mask, mask_argv, remember, reveal

# (given, masked, what another process reveals of the masked form, the secrets that must not show)
HOSTILE = [
    ("postgresql://user:ab/cd@host/db", "postgresql://user:***@host/db", "postgresql://user@host/db", ["ab/cd"]),
    ("postgresql://user:a b@host:5432/db", "postgresql://user:***@host:5432/db", "postgresql://user@host:5432/db",
     ["a b"]),
    ("postgresql://user:it's\"q@host/db", "postgresql://user:***@host/db", "postgresql://user@host/db",
     ["it's\"q"]),
    ("postgresql://user:p@ss@host/db", "postgresql://user:***@host/db", "postgresql://user@host/db", ["p@ss"]),
    ("postgresql+psycopg://user:p:w@host/db", "postgresql+psycopg://user:***@host/db",
     "postgresql+psycopg://user@host/db", ["p:w"]),
    ("postgresql://user:p%40ss%2Fw%20d@host/db", "postgresql://user:***@host/db", "postgresql://user@host/db",
     ["p%40ss%2Fw%20d", "p@ss/w d"]),
    ("mysql://user:x?y@host/db", "mysql://user:***@host/db", "mysql://user@host/db", ["x?y"]),
    ("https://ghp_T0KEN@github.com/org/repo.git", "https://***@github.com/org/repo.git",
     "https://github.com/org/repo.git", ["ghp_T0KEN"]),
    ("https://user:tok%2Fen@mlflow.example.org:5000", "https://user:***@mlflow.example.org:5000",
     "https://user@mlflow.example.org:5000", ["tok%2Fen", "tok/en"]),
    ("postgresql://user@host/db?sslpassword=k3y&sslmode=require",
     "postgresql://user@host/db?sslpassword=***&sslmode=require", "postgresql://user@host/db?sslmode=require",
     ["k3y"]),
    ("postgresql://user:pw9@host/db?password=pw8&sslmode=require",
     "postgresql://user:***@host/db?password=***&sslmode=require", "postgresql://user@host/db?sslmode=require",
     ["pw9", "pw8"]),
    ("http://mlflow:5000/?api_key=AK1&b=2&apikey=AK2", "http://mlflow:5000/?api_key=***&b=2&apikey=***",
     "http://mlflow:5000/?b=2", ["AK1", "AK2"]),
    ("https://h/x?Token=T1;access_token=T2&KEY=T3&secret=T4&sig=T5&pwd=T6&passwd=T7&Signature=T8#top",
     "https://h/x?Token=***;access_token=***&KEY=***&secret=***&sig=***&pwd=***&passwd=***&Signature=***#top",
     "https://h/x#top", ["T1", "T2", "T3", "T4", "T5", "T6", "T7", "T8"]),
    ("https://b.s3.amazonaws.com/k.pt?X-Amz-Algorithm=AWS4-HMAC-SHA256&X-Amz-Credential=AKIA7%2F20261207%2Fs3"
     "&X-Amz-Signature=5ig&X-Amz-Security-Token=5es",
     "https://b.s3.amazonaws.com/k.pt?X-Amz-Algorithm=AWS4-HMAC-SHA256&X-Amz-Credential=***&X-Amz-Signature=***"
     "&X-Amz-Security-Token=***", "https://b.s3.amazonaws.com/k.pt?X-Amz-Algorithm=AWS4-HMAC-SHA256",
     ["AKIA7", "5ig", "5es"]),
    ("s3://AKID:s3kr1t@bucket/runs", "s3://AKID:***@bucket/runs", "s3://AKID@bucket/runs", ["s3kr1t"]),
]
# nothing secret: exactly as given, by mask and by reveal
UNTOUCHED = ["file:///tmp/a@b/mlflow.db", "/tmp/runs/user:pw@x/mlflow.db", "sqlite:////abs/p@th/mlflow.db",
             "postgresql://postgres:@/postgres?host=/tmp/pg", "postgresql://tune@/optuna?host=/tmp/pg",
             "s3://bucket/runs", "journal:/shared/optuna.log", "http://127.0.0.1:5000",
             "http://127.0.0.1:5000/#/experiments/1/runs?workflowType=machine_learning"]


@pytest.fixture(autouse=True)
def _forget(monkeypatch):
    monkeypatch.setattr(credentials, "_KNOWN", {})


@pytest.mark.parametrize(("url", "masked", "elsewhere", "secrets"), HOSTILE, ids=[h[0][:40] for h in HOSTILE])
def test_a_hostile_url_is_masked_whole_and_revealed_exactly(url, masked, elsewhere, secrets):
    assert mask(url) == masked
    assert not [s for s in secrets if s in masked]
    assert mask(masked) == masked  # masked again: unchanged
    assert reveal(masked) == elsewhere  # another process: no secret, the URL still well-formed
    assert remember(url) == masked and reveal(masked) == url  # this process: exactly what was given
    if url.startswith(("postgresql", "mysql")):  # what SQLAlchemy would send is among what was masked
        sent = make_url(url).password
        assert sent is None or sent in {s.replace("%40", "@").replace("%2F", "/").replace("%20", " ")
                                         for s in secrets} or any(s.startswith(sent) for s in secrets)
        assert make_url(masked).password in (None, "***")
        assert make_url(elsewhere).password is None


@pytest.mark.parametrize("url", UNTOUCHED)
def test_a_url_or_path_without_a_secret_is_left_as_it_is(url):
    assert mask(url) == url and reveal(url) == url and remember(url) == url


def test_urls_inside_text_values_and_command_lines_are_masked():
    text = "error: cannot reach postgresql://u:pw1@db/optuna (timeout); the server at https://T0K@h/x said 401."
    assert mask(text) == "error: cannot reach postgresql://u:***@db/optuna (timeout); the server at https://***@h/x " \
                         "said 401."
    nested = {"a": ["postgresql://u:pw2@db/x", ("http://h/?token=t7",)], "n": 3, "p": "/tmp/u:p@x"}
    assert mask(nested) == {"a": ["postgresql://u:***@db/x", ("http://h/?token=***",)], "n": 3, "p": "/tmp/u:p@x"}
    # a password with blanks and quotes, as a shell quotes it: masked word by word before the words are joined
    argv = ["byol", "--optuna-storage", "postgresql://u:a b'c@db/optuna", "--tracking-uri=https://u:x y@h"]
    command = shlex.join(mask_argv(argv))
    assert command == "byol --optuna-storage 'postgresql://u:***@db/optuna' '--tracking-uri=https://u:***@h'"
    # a remembered URL is found whole in running text, blanks in its password and all
    remember("postgresql://u:a b'c@db/optuna")
    assert mask("failed: postgresql://u:a b'c@db/optuna, retrying") == "failed: postgresql://u:***@db/optuna, retrying"
