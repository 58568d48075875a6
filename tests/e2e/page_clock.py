"""A browser page's clock, run faster for a test (a fake-timer technique, on the test's side
only): the page's waits (app.js's poll, reconnect backoff, catch-up, ticket wait, a Retry-After
honoured) take their lengths as app.js has them, counted on a clock `speedup` times as fast.

Installed before any of the page's scripts run, on every document the browser loads from then
on: setTimeout and setInterval wait a `speedup`-th of the delay asked, and performance.now()
counts `speedup` times as fast. So the page's timers and its own measure of time agree as they do
unscaled (a pause set to performance.now() + 6000 ends when a 6000 ms timer fires), and what a
test reads of the page's times (performance.now(), as its played scripts record it) is the page's:
an assertion that a read came no sooner than 8000 ms after a refusal means what it meant.

What does not run on the page's clock keeps its own pace, and looks `speedup` times as slow to
the page: the shop's answers, an order's payment and its notification, the test's own clicks. A
test that races one of those against a page's wait (an order paid while the page is paused) is
sped up only as far as the race stays on its side. The wall clock (Date) is left real: app.js
only takes the session's expiry and its kept keys' age from it. So a session lasts its real
AUTH_TOKEN_TTL_SECONDS: the expiry's timer, sped up, fires early, finds the token (by Date) not
yet expired and waits again (watchExpiry), as it does when a session outlasts a timer's longest
wait."""

from __future__ import annotations

SPED_UP_CLOCK = """
(() => {
  const speedup = %(speedup)r;
  const realNow = performance.now.bind(performance);
  const realSetTimeout = window.setTimeout.bind(window);
  const realSetInterval = window.setInterval.bind(window);
  const realDelay = (delay) => (Number(delay) || 0) / speedup;
  performance.now = () => realNow() * speedup;
  window.setTimeout = (handler, delay, ...args) =>
    realSetTimeout(handler, realDelay(delay), ...args);
  window.setInterval = (handler, delay, ...args) =>
    realSetInterval(handler, realDelay(delay), ...args);
})();
"""

# How early, in real milliseconds, a timer may seem to fire by performance.now() (the two count
# in steps of their own): a page's time a test compares with a wait's end allows for
# `speedup` times as much on the page's clock (rounding_ms).
TIMER_ROUNDING_MS = 5


def speed_up_the_pages_clock(driver, speedup: float) -> None:
    """Every page `driver` loads from now on runs its clock `speedup` times as fast."""
    if speedup < 1:
        raise ValueError("a page's clock is only ever sped up")
    driver.execute_cdp_cmd("Page.addScriptToEvaluateOnNewDocument",
                           {"source": SPED_UP_CLOCK % {"speedup": float(speedup)}})


def rounding_ms(speedup: float) -> float:
    """Timers' own rounding, on the page's clock run `speedup` times as fast."""
    return TIMER_ROUNDING_MS * speedup
