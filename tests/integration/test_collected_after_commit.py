"""`collected_after_commit`: one collector per transaction and key, which callers add to from
anywhere in the transaction, run once after its commit (as after_commit runs a callback), never
after a rollback."""

from __future__ import annotations

import pytest
from sqlalchemy import text
from sqlalchemy.exc import OperationalError

from shared.db import after_commit, collected_after_commit, db, transaction
from tests.postgres_tools import the_next_commits_answer_lost


class _Said:
    """A collector of words, which says them all into `said` when run."""

    def __init__(self, said: list):
        self.said = said
        self.words: list[str] = []

    def __call__(self) -> None:
        self.said.append(tuple(self.words))


def test_a_transaction_has_one_collector_under_a_key_run_once_with_all_added_to_it(in_payments):
    said: list = []
    made: list[_Said] = []

    def made_anew() -> _Said:
        made.append(_Said(said))
        return made[-1]

    with transaction() as session:
        first = collected_after_commit(session, "words", made_anew)
        first.words.append("one")
        again = collected_after_commit(session, "words", made_anew)
        again.words.append("two")
        assert again is first and len(made) == 1
        assert said == []  # (not before the commit)
    assert said == [("one", "two")]


def test_collectors_under_distinct_keys_are_distinct_each_run_once(in_payments):
    said: list = []
    with transaction() as session:
        collected_after_commit(session, "a", lambda: _Said(said)).words.append("for a")
        collected_after_commit(session, ("b", 1), lambda: _Said(said)).words.append("for b")
        collected_after_commit(session, "a", lambda: _Said(said)).words.append("for a again")
    assert said == [("for a", "for a again"), ("for b",)]


def test_a_transaction_rolled_back_runs_no_collector(in_payments):
    said: list = []
    with pytest.raises(RuntimeError, match="rolled back"):
        with transaction() as session:
            collected_after_commit(session, "words", lambda: _Said(said)).words.append("undone")
            raise RuntimeError("rolled back")
    assert said == []


def test_the_next_transaction_has_a_new_collector(in_payments):
    said: list = []
    collectors = []
    for words in ("first", "second"):
        with transaction() as session:
            collectors.append(collected_after_commit(session, "words", lambda: _Said(said)))
            collectors[-1].words.append(words)
    assert collectors[0] is not collectors[1]
    assert said == [("first",), ("second",)]


def test_a_collector_runs_in_the_place_of_its_first_ask_among_the_callbacks(in_payments):
    said: list = []
    with transaction() as session:
        after_commit(session, lambda: said.append("before"))
        collected_after_commit(session, "words", lambda: _Said(said)).words.append("first")
        after_commit(session, lambda: said.append("between"))
        collected_after_commit(session, "words", lambda: _Said(said)).words.append("later")
    assert said == ["before", ("first", "later"), "between"]


@pytest.mark.parametrize("asking", [(True,), (False, True), (True, False)],
                         ids=["asked so", "asked so later", "asked so first"])
def test_a_collector_any_ask_wanted_run_also_if_unanswered_runs_when_the_answer_is_lost(
        in_payments, asking):
    """As a callback registered again asking for it (the cache's bumps count on it): once, with
    all that was added to it; one nobody asked it of does not run."""
    said: list = []
    with the_next_commits_answer_lost(db.engine) as lost, \
            pytest.raises(OperationalError, match="server closed the connection"):
        with transaction() as session:
            session.execute(text("SELECT 1"))
            for n, also_if_unanswered in enumerate(asking):
                collected_after_commit(session, "bump", lambda: _Said(said),
                                       also_if_unanswered=also_if_unanswered
                                       ).words.append(f"ask {n}")
            collected_after_commit(session, "tell", lambda: _Said(said)).words.append("told")
    assert lost
    assert said == [tuple(f"ask {n}" for n in range(len(asking)))]
