"""`make run` signs with secrets of the checkout's own: made once, kept in `.run/secrets` (its
owner's only), the same on every later run, handed to every process it starts; a secret the user
set in the environment is theirs."""

from __future__ import annotations

import secrets
import stat
import threading
from concurrent.futures import ThreadPoolExecutor

import pytest

from devstack.local_secrets import SECRETS_FILE, checkout_secrets, secrets_to_hand_out
from devstack.stack import Stack
from shared.config import PUBLISHED_SECRETS, SECRETS


def _mode(path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


def test_a_checkouts_secrets_are_made_once_kept_for_its_owner_only_and_read_again(tmp_path):
    path = tmp_path / ".run" / SECRETS_FILE  # (no .run yet: a fresh checkout)
    made = checkout_secrets(path)

    assert sorted(made) == sorted(SECRETS)
    for name, value in made.items():
        assert value not in PUBLISHED_SECRETS[name] and len(value) >= 43, name
    assert len(set(made.values())) == len(SECRETS)
    assert _mode(path) == 0o600
    kept = path.read_text()
    assert checkout_secrets(path) == made
    assert path.read_text() == kept


def test_a_secret_missing_from_the_file_is_made_and_the_ones_kept_stay(tmp_path):
    path = tmp_path / SECRETS_FILE
    path.write_text("INTERNAL_AUTH_SECRET=kept-from-before\n")
    path.chmod(0o644)

    secrets = checkout_secrets(path)

    assert secrets["INTERNAL_AUTH_SECRET"] == "kept-from-before"
    assert secrets["AUTH_TOKEN_SECRET"] not in PUBLISHED_SECRETS["AUTH_TOKEN_SECRET"]
    assert checkout_secrets(path) == secrets
    assert _mode(path) == 0o600


def test_a_file_loosened_since_is_made_its_owners_only_again(tmp_path):
    path = tmp_path / SECRETS_FILE
    secrets = checkout_secrets(path)
    path.chmod(0o644)
    assert checkout_secrets(path) == secrets
    assert _mode(path) == 0o600


def test_two_runs_making_a_fresh_checkouts_secrets_at_once_hand_out_the_ones_kept(tmp_path,
                                                                                  monkeypatch):
    """Two `make run`s started at once in a fresh checkout (the second then stops: devstack.
    leftovers) both find no file and make secrets; the one kept is the one both hand out, where
    each handed out its own and the later write won, so that the tokens the running one signed
    were refused after its next restart."""
    path = tmp_path / SECRETS_FILE
    both_made_theirs = threading.Barrier(2)
    waited = threading.local()
    token_urlsafe = secrets.token_urlsafe

    def made_once_both_have_read(nbytes):
        if not getattr(waited, "done", False):  # (each run has read the missing file by now)
            waited.done = True
            both_made_theirs.wait(timeout=10)
        return token_urlsafe(nbytes)

    monkeypatch.setattr(secrets, "token_urlsafe", made_once_both_have_read)
    with ThreadPoolExecutor(2) as runs:
        handed_out = list(runs.map(checkout_secrets, [path, path]))

    assert handed_out[0] == handed_out[1]
    monkeypatch.undo()
    assert checkout_secrets(path) == handed_out[0]
    assert _mode(path) == 0o600


def test_a_secret_set_in_the_environment_is_not_handed_out(tmp_path):
    path = tmp_path / SECRETS_FILE
    assert secrets_to_hand_out(path, {"AUTH_TOKEN_SECRET": "the user's own"}) == {
        "INTERNAL_AUTH_SECRET": checkout_secrets(path)["INTERNAL_AUTH_SECRET"]}


@pytest.fixture
def make_run(tmp_path, monkeypatch):
    """`make run` in a checkout at tmp_path, each run stopped as its processes would start: the
    environment each run would have given them."""
    import devstack.__main__ as make_run

    given: list[dict[str, str]] = []

    class Recorded(Stack):
        def start(self, timeout: float = 60):
            self._env = self._build_env("postgresql://postgres@127.0.0.1:5432",
                                        "redis://127.0.0.1:6379")
            given.append(self._process_env())  # (what migrations, APIs and workers all get)
            raise RuntimeError("stopped here")

    for name in SECRETS:  # (as a user who set none; a test layer before may have)
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setattr(make_run, "REPO_ROOT", tmp_path)
    monkeypatch.setattr(make_run, "Stack", Recorded)

    def run() -> dict[str, str]:
        assert make_run.run() == 1
        return given[-1]
    return run


def test_make_run_gives_every_process_the_checkouts_secrets_the_same_on_every_run(tmp_path,
                                                                                  make_run):
    first = make_run()
    kept = checkout_secrets(tmp_path / ".run" / SECRETS_FILE)
    assert {name: first[name] for name in SECRETS} == kept
    assert _mode(tmp_path / ".run" / SECRETS_FILE) == 0o600
    again = make_run()  # (a restart: the tokens users were given still verify)
    assert {name: again[name] for name in SECRETS} == kept


def test_make_run_leaves_a_secret_the_user_set_as_they_set_it(tmp_path, make_run, monkeypatch):
    monkeypatch.setenv("AUTH_TOKEN_SECRET", "the user's own")
    given = make_run()
    assert given["AUTH_TOKEN_SECRET"] == "the user's own"
    assert given["INTERNAL_AUTH_SECRET"] == checkout_secrets(
        tmp_path / ".run" / SECRETS_FILE)["INTERNAL_AUTH_SECRET"]


def test_the_settings_file_for_the_tools_is_its_owners_only(tmp_path):
    """`.run/env` holds the secrets `make run` handed out."""
    stack = Stack(tmp_path, env_overrides=checkout_secrets(tmp_path / SECRETS_FILE))
    stack._env = stack._build_env("postgresql://postgres@127.0.0.1:5432",
                                  "redis://127.0.0.1:6379")
    env_file = tmp_path / "env"
    env_file.write_text("left by a run before\n")
    env_file.chmod(0o644)

    stack.write_env_file(env_file)

    assert _mode(env_file) == 0o600
    assert f"AUTH_TOKEN_SECRET={stack.env['AUTH_TOKEN_SECRET']}\n" in env_file.read_text()
