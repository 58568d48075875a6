"""What an app opened, released with it. Each part that opens connections or threads for an app
(its database engine's pool, its Redis clients, its cache's retrying thread) names, as it is set
up, the call that releases them (`close_with`); `close_app` makes those calls, the last part set up
first. A service's process keeps its app for its life and never calls it; the tests, which build
apps by the dozen, close each they made, whose pooled connections would otherwise stay open until
the garbage collector came upon the app (or the run ended).

An app is not to be used once closed: its Redis clients would connect again at its next request,
and nothing would release those connections, and its cache no longer tries again the version
bumps it failed to make (their values could be served stale)."""

from __future__ import annotations

from collections.abc import Callable

from flask import Flask

_CLOSES = "hseshop.closes"


def close_with(app: Flask, close: Callable[[], None]) -> None:
    """Have `close_app(app)` call `close`."""
    app.extensions.setdefault(_CLOSES, []).append(close)


def close_app(app: Flask) -> None:
    """Release what `app` opened (each release once: a second call does nothing). A release that
    fails does not keep the others from being made; the first failure is raised after them."""
    failure: BaseException | None = None
    for close in reversed(app.extensions.pop(_CLOSES, [])):
        try:
            close()
        except BaseException as exc:  # (raised once every release is made)
            failure = failure or exc
    if failure is not None:
        raise failure
