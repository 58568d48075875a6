"""What the answers to a keyed request, its repeat and its key reused say of replays, whatever
client asked (Flask's test client, or requests against a running shop)."""

from __future__ import annotations

import json
from collections.abc import Callable

from shared.idempotency import REPLAYED, REPLAYED_HEADER


def assert_only_the_repeat_said_replayed(what: str, status: int, first, again, reused,
                                         body_of: Callable[..., bytes]) -> None:
    """`first` answered a keyed request with `status`, `again` its repeat (same key and body),
    `reused` the key with another body: only the repeat says `Idempotent-Replayed: true`, with the
    first answer's status and body, byte for byte (the same JSON text: its keys in the same order,
    its numbers and strings written alike), and the reused key is a 422. `body_of` reads an
    answer's body as bytes; `what` names the operation in a failure."""
    assert first.status_code == status and REPLAYED_HEADER not in first.headers, what
    assert again.headers.get(REPLAYED_HEADER) == REPLAYED, what
    assert (again.status_code, body_of(again)) == (status, body_of(first)), what
    assert reused.status_code == 422, what
    assert json.loads(body_of(reused))["error"]["code"] == "IDEMPOTENCY_KEY_REUSED", what
    assert REPLAYED_HEADER not in reused.headers, what


def replayed_responses(keyed_operations: dict, kept_refusals: dict) -> set[tuple[str, str, int]]:
    """The responses (method, path, status) an answer replayed can be: each keyed operation's
    success (its status the second of what `keyed_operations` gives it, after its key: method and
    path, and a service's name first on a service's) and the refusals of `kept_refusals`."""
    return ({(*operation[-2:], answer[1]) for operation, answer in keyed_operations.items()}
            | {(*operation[-2:], status) for operation, statuses in kept_refusals.items()
               for status in statuses})
