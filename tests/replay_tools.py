"""What the answers to a keyed request, its repeat and its key reused say of replays, whatever
client asked (Flask's test client, or requests against a running shop)."""

from __future__ import annotations

from collections.abc import Callable

from shared.idempotency import REPLAYED, REPLAYED_HEADER


def assert_only_the_repeat_said_replayed(what: str, status: int, first, again, reused,
                                         json_of: Callable) -> None:
    """`first` answered a keyed request with `status`, `again` its repeat (same key and body),
    `reused` the key with another body: only the repeat says `Idempotent-Replayed: true`, with the
    first answer's status and body, and the reused key is a 422. `json_of` reads an answer's body;
    `what` names the operation in a failure."""
    assert first.status_code == status and REPLAYED_HEADER not in first.headers, what
    assert again.headers.get(REPLAYED_HEADER) == REPLAYED, what
    assert (again.status_code, json_of(again)) == (status, json_of(first)), what
    assert reused.status_code == 422, what
    assert json_of(reused)["error"]["code"] == "IDEMPOTENCY_KEY_REUSED", what
    assert REPLAYED_HEADER not in reused.headers, what
