"""The web shop page in a real headless Chromium: a person signs up, opens an account, tops up,
orders, and watches each order's badge turn FINISHED or CANCELLED without reloading the page. And
the docs, Swagger UI, under the same policy as the page."""

from __future__ import annotations

import json
import time
import uuid
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from decimal import Decimal
from pathlib import Path
from urllib.parse import parse_qs, urlsplit

import pytest
import requests
from selenium import webdriver
from selenium.common.exceptions import NoSuchElementException, StaleElementReferenceException
from selenium.webdriver.chrome.service import Service
from selenium.webdriver.common.by import By
from selenium.webdriver.support.ui import WebDriverWait
from simple_websocket import ConnectionClosed
from sqlalchemy import text
from sqlalchemy.orm import Session
from wsproto.frame_protocol import CloseReason

from devstack.stack import API_WORKERS, REPO_ROOT
from gateway_app import notifications
from gateway_app.notifications import SOCKETS_PER_USER
from tests.e2e.gateway_client import GatewayClient, Listener
from tests.e2e.page_clock import rounding_ms, speed_up_the_pages_clock
from tests.network_tools import HoldingProxy
from tests.polling import wait_for

CHROMIUM = Path("/usr/bin/chromium")
CHROMEDRIVER = Path("/usr/bin/chromedriver")
ARTIFACTS = REPO_ROOT / "test-artifacts"
# How long an order may take to be paid or cancelled and shown, from the click to the badge.
LIVE_DEADLINE = 15
PAGE_DEADLINE = 10
PASSWORD = "correct horse battery"
# How many times as fast the page's clock runs (tests/e2e/page_clock.py) in a test that waits on
# app.js's own timers (its poll, reconnect backoff, catch-up, a socket's time to work, a ticket's
# wait) with nothing of the shop's or its own racing them: the page's lengths, in a tenth of the
# time. (A minute of the page's clock is then six seconds: its balance's read now and then,
# BALANCE_READ_MS, falls within such a test, which must not take it for what it waits for.) Two
# waits of the page's do race the shop here: its give-up on a ticket request (TICKET_WAIT_MS,
# 10 s), sped up too, gives up a real ticket request after 1 s real, and asks again; a ticket is
# answered in well under that, but a machine busy for a second more sees the page ask twice. And
# its give-up on a read (READ_WAIT_MS, 30 s), after 3 s real: a read is answered in well under
# that.
CLOCK_SPEEDUP = 10
# ... in a test that races a step of its own or the shop's (a click and its answer, some 0.5 s, an
# order paid and its notification, some 1 to 2 s) against a page's wait of a few seconds (a
# Retry-After, a pause): the step must still fall within the wait, on the page's clock; and in one
# whose wait must give up before the page's read of the balance now and then (BALANCE_READ_MS, 45 s
# at the soonest on the page's clock: 15 s) could end it.
RACING_CLOCK_SPEEDUP = 3
# ... in the one that races an order's payment and its notification (some 1 to 2 s) against a
# pause of 10 s on the page's clock, and then the catch-up's refusal too.
PAYMENT_RACING_CLOCK_SPEEDUP = 2
# ... in one that holds a read of the page's on its way (a slow link) over a poll's wait and while
# the shop places 51 orders (some seconds): a read held past READ_WAIT_SECONDS on the page's clock
# is given up on by the page.
HELD_READ_CLOCK_SPEEDUP = 2


@pytest.fixture
def browser(tmp_path):
    if not (CHROMIUM.exists() and CHROMEDRIVER.exists()):
        pytest.fail(f"{CHROMIUM} and {CHROMEDRIVER} are needed: run `make browser` "
                    "(as root: apt-get install -y chromium chromium-driver)")
    options = webdriver.ChromeOptions()
    options.binary_location = str(CHROMIUM)
    for flag in ("--headless=new", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage",
                 "--disable-background-networking", "--disable-component-update",
                 "--disable-sync", "--no-first-run", "--window-size=1200,900",
                 f"--user-data-dir={tmp_path / 'chromium-profile'}"):
        options.add_argument(flag)
    options.set_capability("goog:loggingPrefs", {"browser": "ALL"})
    # A given driver path means Selenium Manager never looks for (or downloads) one.
    driver = webdriver.Chrome(service=Service(executable_path=str(CHROMEDRIVER)), options=options)
    try:
        yield driver
    finally:
        driver.quit()


class ShopPage:
    """The page as a person uses it, through the ids and data-testid attributes it promises."""

    def __init__(self, driver, url: str):
        self.driver = driver
        self.url = url

    def open(self) -> ShopPage:
        self.driver.get(self.url)
        self.wait_until(lambda: self.visible("auth-section") or self.visible("shop-section"))
        return self

    # --- reading ---------------------------------------------------------------------------------

    def element(self, element_id: str):
        return self.driver.find_element(By.ID, element_id)

    def visible(self, element_id: str) -> bool:
        return self.element(element_id).is_displayed()

    def text(self, element_id: str) -> str:
        return self.element(element_id).text

    def order_ids(self) -> list[str]:
        # Read in one script run: the list is redrawn on every live change, so elements found
        # first and read one by one afterwards may already be gone.
        return self.driver.execute_script(
            'return Array.from(document.querySelectorAll(\'[data-testid="order"]\'),'
            ' item => item.getAttribute("data-order-id"));')

    def badge(self, order_id: str):
        return self.driver.find_element(
            By.CSS_SELECTOR, f'[data-order-id="{order_id}"] [data-testid="order-status"]')

    def wait_until(self, condition, timeout: float = PAGE_DEADLINE, what: str = "the page"):
        def check(_driver):
            try:
                return condition()
            except (NoSuchElementException, StaleElementReferenceException):
                return False  # the list is redrawn on each change; look again

        try:
            return WebDriverWait(self.driver, timeout, poll_frequency=0.1).until(check)
        except Exception as exc:
            message = self.text("message") if self.visible("message") else "(no message shown)"
            console = [entry["message"] for entry in self.driver.get_log("browser")]
            self.screenshot("web-page-failure.png")
            raise AssertionError(f"waiting for {what}: {exc!r}; page message: {message}; "
                                 f"browser console: {console}") from exc

    # --- doing -----------------------------------------------------------------------------------

    def fill(self, element_id: str, value: str) -> None:
        field = self.element(element_id)
        field.clear()
        field.send_keys(value)

    def sign_in(self, username: str, password: str) -> None:
        self.fill("username", username)
        self.fill("password", password)
        self.element("sign-in").click()
        self.wait_until(lambda: self.visible("shop-section"), what="the shop after signing in")

    def sign_up(self, username: str, password: str) -> None:
        self.fill("username", username)
        self.fill("password", password)
        self.element("sign-up").click()
        self.wait_until(lambda: self.visible("shop-section"), what="the shop after signing up")
        self.wait_until(lambda: self.text("current-user") == username)

    def open_account(self) -> None:
        self.wait_until(lambda: self.visible("open-account"), what="the open-account button")
        self.element("open-account").click()
        self.wait_until(lambda: self.text("balance") == "0.00", what="the new account's balance")

    def top_up(self, amount: str) -> None:
        self.fill("topup-amount", amount)
        self.element("topup-submit").click()

    def top_up_retried(self, amount: str, what: str = "the top-up retried") -> None:
        """Tops up `amount` (as typed), a top-up that had gone through already (its answer lost,
        or not to be trusted), and waits until the page says so: not counted again."""
        self.top_up(amount)
        said = f"{Decimal(amount.replace(',', '.')):.2f}"  # as the shop writes it
        self.wait_until(lambda: self.text("message") == f"The top-up of {said} had gone through"
                        " already; it was not counted again.", what=what)

    def place_order(self, amount: str, description: str) -> str:
        """Places an order and returns its id, once it appears at the top of the list."""
        before = set(self.order_ids())
        self.fill("order-amount", amount)
        self.fill("order-description", description)
        self.element("order-submit").click()

        def new_order_on_top() -> str | None:
            ids = self.order_ids()
            return ids[0] if ids and ids[0] not in before else None

        return self.wait_until(new_order_on_top, what=f"the order of {amount} in the list")

    def wait_for_status(self, order_id: str, status: str) -> None:
        self.wait_until(lambda: self.badge(order_id).get_attribute("data-status") == status,
                        timeout=LIVE_DEADLINE, what=f"order {order_id} to show {status}")

    def screenshot(self, name: str) -> Path:
        ARTIFACTS.mkdir(exist_ok=True)
        path = ARTIFACTS / name
        self.driver.save_screenshot(str(path))
        return path


def test_the_gateway_serves_the_page_with_its_script_and_styles(stack):
    page = requests.get(f"{stack.gateway_url}/", timeout=10)
    assert page.status_code == 200 and "/static/app.js" in page.text
    served = [page]
    for asset, kind in (("app.js", "javascript"), ("style.css", "text/css")):
        response = requests.get(f"{stack.gateway_url}/static/{asset}", timeout=10)
        assert response.status_code == 200, (
            f"/static/{asset}: {response.status_code} {response.text}")
        assert kind in response.headers["Content-Type"]
        served.append(response)
    # Only its own files and origin, never framed (the browser tests below run under this policy),
    # the page and each of its files alike.
    for response in served:
        assert "default-src 'self'" in response.headers["Content-Security-Policy"]
        assert "frame-ancestors 'none'" in response.headers["Content-Security-Policy"]
        assert response.headers["X-Content-Type-Options"] == "nosniff"


def test_a_shopper_sees_orders_finish_and_cancel_live_without_reloading(stack, browser):
    page = ShopPage(browser, f"{stack.gateway_url}/").open()
    username = f"web_{uuid.uuid4().hex[:12]}"
    page.sign_up(username, PASSWORD)
    page.open_account()
    page.top_up("100")
    page.wait_until(lambda: page.text("balance") == "100.00", what="the balance after topping up")
    # A reload would drop this marker, so its survival proves every change below arrived live.
    browser.execute_script("window.hseshopNoReload = true;")

    paid = page.place_order("30", "a book")
    page.wait_for_status(paid, "FINISHED")
    assert "FINISHED" in page.badge(paid).text
    page.wait_until(lambda: page.text("balance") == "70.00", what="the balance after paying 30")

    too_dear = page.place_order("500", "a piano")
    page.wait_for_status(too_dear, "CANCELLED")
    badge = page.badge(too_dear)
    assert badge.get_attribute("data-reason") == "INSUFFICIENT_FUNDS"
    assert "insufficient funds" in badge.text
    assert page.text("balance") == "70.00"

    assert page.order_ids() == [too_dear, paid]  # newest first
    assert browser.execute_script("return window.hseshopNoReload === true;")
    console = [entry["message"] for entry in browser.get_log("browser")]
    refused = [message for message in console if "Content Security Policy" in message]
    assert not refused, refused  # the page's own policy stopped nothing it does
    # (Answers the page expects, as a 404 for the balance before the account is opened, are
    # logged as failed loads too; an icon asked for and never had is not one.)
    assert not [message for message in console if "favicon" in message], console
    shot = page.screenshot("web-page.png")
    assert shot.is_file() and shot.stat().st_size > 0


NARROW_WINDOW_PX = 485  # a phone's screen, or a narrow window


def test_a_long_username_leaves_the_sign_out_buttons_on_a_narrow_screen(stack, browser):
    """The top bar's row of the user's name, the live status and the sign-out buttons did not
    wrap, nor did the name (up to 64 characters with nowhere to break): a long one pushed the
    buttons past the right edge of a narrow window, out of reach. They stay within it."""
    browser.set_window_size(NARROW_WINDOW_PX, 900)
    shopper = GatewayClient(stack.gateway_url, username="n" * 52 + uuid.uuid4().hex[:12])
    assert len(shopper.username) == 64  # the longest the gateway takes
    page = ShopPage(browser, f"{stack.gateway_url}/").open()
    page.sign_in(shopper.username, "a long password")
    page.wait_until(lambda: page.text("current-user") == shopper.username)
    viewport, edges = browser.execute_script("""
        return [document.documentElement.clientWidth,
                ["sign-out", "sign-out-everywhere"].map(
                  (id) => document.getElementById(id).getBoundingClientRect().right)];""")
    assert viewport <= NARROW_WINDOW_PX, viewport
    assert all(edge <= viewport for edge in edges), (viewport, edges)


# Whether the page's message area is rendered as a live region (not display: none, which takes it
# out of what a screen reader follows): its role, aria-live and computed display, and its text.
MESSAGE_AREA = """
const box = document.getElementById("message");
return [box.getAttribute("role"), box.getAttribute("aria-live"), box.hidden,
        getComputedStyle(box).display, box.textContent];
"""
ANNOUNCEMENTS = """
const log = document.getElementById("order-announcements");
return [log.getAttribute("aria-live"), Array.from(log.children, (line) => line.textContent)];
"""


def _announced(page: ShopPage) -> list[str]:
    return page.driver.execute_script(ANNOUNCEMENTS)[1]


def test_messages_and_each_orders_status_change_are_announced_to_screen_readers(stack, browser):
    """The message area, a live region, was hidden (display: none) when empty and shown as it was
    filled, in one step: screen readers often announce none of it; and an order's badge turning
    FINISHED or CANCELLED was in no live region at all. The message area stays rendered (empty,
    it takes no room: not displayed, to Selenium), and each order's final status is said once in
    a live region of its own, the list (drawn again on every change) in none."""
    page, shopper = _shopper_with_100_on_the_page(stack, browser)
    assert browser.execute_script(MESSAGE_AREA) == ["status", "polite", False, "block", ""]
    assert not page.visible("message")
    assert browser.execute_script(
        'return document.getElementById("orders").closest("[aria-live], [role]");') is None

    paid = page.place_order("30", "a book")
    page.wait_until(lambda: browser.execute_script(MESSAGE_AREA)[3:] == [
        "block", "Order for 30.00 placed; its status updates below."], what="the order's message")
    page.wait_for_status(paid, "FINISHED")
    page.wait_until(lambda: _announced(page) == ["Order 30.00 'a book': FINISHED · paid"],
                    what="the order's status announced")
    too_dear = page.place_order("500", "a piano")
    page.wait_for_status(too_dear, "CANCELLED")
    page.wait_until(lambda: len(_announced(page)) == 2, what="the second order's status announced")
    assert browser.execute_script(ANNOUNCEMENTS) == ["polite", [
        "Order 30.00 'a book': FINISHED · paid",
        "Order 500.00 'a piano': CANCELLED · insufficient funds"]]

    page.element("sign-out").click()
    page.wait_until(lambda: page.visible("auth-section"), what="the sign-in form")
    assert browser.execute_script(MESSAGE_AREA) == ["status", "polite", False, "block", ""]
    assert _announced(page) == []  # (the user's orders are not left behind)


# What every script below that plays the page's fetch runs it in (see _fetch_played).
FETCH_PLAYED = """
(() => {
  const realFetch = window.fetch.bind(window);
  // An answer as the gateway words a refusal: {"error": {"code", "message", "details"}}.
  const refusal = (status, code, message, headers = {}) => new Response(
    JSON.stringify({error: {code, message, details: {}}}),
    {status, headers: {"Content-Type": "application/json", ...headers}});
  %(before)s
  window.fetch = async (input, init) => {
    const url = typeof input === "string" ? input : input.url;
    const path = new URL(url, location.href).pathname;
    const method = (init && init.method) || "GET";
    %(answer)s
  };
})();
"""


def _fetch_played(answer: str, before: str = "") -> str:
    """A script for the browser to run before the page's own, that plays the page's fetch:
    `answer` is the body of an async function of each request (`input`, `init`, its `path` and
    `method`) that answers it, `realFetch(input, init)` sending it on and `refusal(status, code,
    message, headers)` making a refusal as the gateway words one; `before` runs once, first. Each
    script keeps its names to itself: one played over another (over READS_AND_SOCKETS_RECORDED,
    say) sends on through the other's."""
    return FETCH_PLAYED % {"before": before, "answer": answer}


# Played by the browser itself, before the page's scripts run: the gateway's answer to a user
# past the rate limit (as tests/integration/test_gateway.py sees it), for the page's first read.
FIRST_READ_RATE_LIMITED = _fetch_played(before="window.hseshopNewestReads = [];", answer="""
    if (path === "/api/notifications/newest") {
      window.hseshopNewestReads.push(performance.now());
      if (window.hseshopNewestReads.length === 1) {
        return refusal(429, "RATE_LIMITED", "Too many requests.", {"Retry-After": "3"});
      }
    }
    return realFetch(input, init);""")


def test_a_page_told_to_wait_loads_the_shop_no_sooner_than_it_was_told(stack, browser):
    """The page's own logic (its first read's answer is played, the rest is real): refused with
    Retry-After 3, the page says so and reads again after 3 s, not after its own 1 s backoff.
    (The page's clock sped up as far as its message stays up long enough to be read.)"""
    speed_up_the_pages_clock(browser, RACING_CLOCK_SPEEDUP)
    browser.execute_cdp_cmd("Page.addScriptToEvaluateOnNewDocument",
                            {"source": FIRST_READ_RATE_LIMITED})
    page = ShopPage(browser, f"{stack.gateway_url}/").open()
    page.sign_up(f"web_{uuid.uuid4().hex[:12]}", PASSWORD)
    page.wait_until(lambda: "Try again in 3 s" in page.text("message"),
                    what="the page to say how long to wait")
    page.wait_until(lambda: page.visible("open-account"), what="the shop loaded after the wait")
    reads = browser.execute_script("return window.hseshopNewestReads;")
    assert len(reads) == 2, reads
    assert reads[1] - reads[0] >= 3000 - rounding_ms(RACING_CLOCK_SPEEDUP), reads


# Played by the browser itself: the page's second and third reads of its first page of orders (the
# first is the shop's load; then those of orders a notification names that the page does not know)
# are refused, the first as a service unavailable a moment (no Retry-After), the second as a rate
# limit with Retry-After 8; the rest is real. Every read is recorded.
ORDER_READS_REFUSED = _fetch_played(before="window.hseshopReads = [];", answer="""
    const at = performance.now();
    const listed = window.hseshopReads.filter((read) => read.path === "/api/orders").length;
    if (path === "/api/orders" && method === "GET" && [1, 2].includes(listed)) {
      window.hseshopReads.push({path, at, refused: true});
      const [status, code, headers] = listed === 1 ? [503, "SERVICE_UNAVAILABLE", {}]
                                                   : [429, "RATE_LIMITED", {"Retry-After": "8"}];
      return refusal(status, code, "Not now.", headers);
    }
    window.hseshopReads.push({path, at, refused: false});
    return realFetch(input, init);""")


def _shopper_with_100_on_the_page(stack, browser, *played: str,
                                  base_url: str | None = None) -> tuple[ShopPage, GatewayClient]:
    """A shopper, signed up with an account of 100, on the page (at `base_url`, the gateway's
    unless given) with each of `played` run before its scripts (played by the browser itself),
    its balance shown."""
    for script in played:
        browser.execute_cdp_cmd("Page.addScriptToEvaluateOnNewDocument", {"source": script})
    shopper = GatewayClient(stack.gateway_url)
    shopper.open_account_with("100")
    page = ShopPage(browser, f"{base_url or stack.gateway_url}/").open()
    page.sign_in(shopper.username, "a long password")
    page.wait_until(lambda: page.text("balance") == "100.00", what="the balance")
    return page, shopper


def _live_page_of_a_shopper_with_100(stack, browser, played: str) -> tuple[ShopPage,
                                                                             GatewayClient]:
    """A shopper with an account of 100 on the page, `played` run before its scripts, its
    balance shown and its socket open."""
    page, shopper = _shopper_with_100_on_the_page(stack, browser, played)
    page.wait_until(lambda: page.element("live-status").get_attribute("data-state") == "live",
                    what="the page's socket open")
    return page, shopper


def test_a_page_that_missed_orders_catches_up_once_and_no_sooner_than_it_was_told(stack,
                                                                                  browser):
    """Two orders placed elsewhere (another tab, say) are paid while the page cannot read them:
    the first read refused for a moment (a catch-up is due in 5 s), the second with Retry-After 8.
    The page catches up once, no sooner than the later answer said (not at the first's 5 s), and
    reads the balance then too: both orders show FINISHED and the balance what they left."""
    page, elsewhere = _live_page_of_a_shopper_with_100(stack, browser, ORDER_READS_REFUSED)

    def refused_reads() -> list[dict]:
        reads = browser.execute_script("return window.hseshopReads;")
        return [read for read in reads if read["refused"]]

    first = elsewhere.place_order("30")["id"]
    page.wait_until(lambda: len(refused_reads()) == 1, timeout=LIVE_DEADLINE,
                    what="the first order's read, refused")
    second = elsewhere.place_order("20")["id"]
    page.wait_until(lambda: len(refused_reads()) == 2, timeout=LIVE_DEADLINE,
                    what="the second order's read, refused with Retry-After 8")
    page.wait_until(lambda: page.text("balance") == "50.00", timeout=LIVE_DEADLINE,
                    what="the balance after the catch-up")
    page.wait_for_status(first, "FINISHED")
    page.wait_for_status(second, "FINISHED")
    # What the refusals said is made good: it is no longer shown.
    page.wait_until(lambda: not page.visible("message"), what="the refusal's message cleared")

    reads = browser.execute_script("return window.hseshopReads;")
    told_at = refused_reads()[1]["at"]
    after = [read for read in reads if read["at"] > told_at]
    lists = [read["at"] - told_at for read in after if read["path"] == "/api/orders"]
    balances = [read["at"] - told_at for read in after if read["path"] == "/api/accounts/balance"]
    assert len(lists) == 1 and lists[0] >= 8000 - 5, (lists, reads)  # (timers' own rounding)
    # The orders it did not know were read with the first page, not one request each.
    assert not [read for read in reads if read["path"].startswith("/api/orders/")], reads
    assert balances and min(balances) >= 8000 - 5, (balances, reads)


def _held_while_told(name: str, which: str, answers: bool = False) -> str:
    """A script that plays the page's fetch (_fetch_played): while window.hseshop<name>Held is
    set, each request `which` is true of (a condition on its `url`, `path` and `method`) is held
    on its way to the gateway (a slow link, a socket away), or with `answers` its answer on its
    way back (the request carried out), until the test lets them go
    (window.hseshopLet<name>Go()); how many were held is kept (window.hseshop<name>HeldCount).
    The rest is real."""
    return _fetch_played(before="""
    window.hseshop%(name)sHeld = false;
    window.hseshop%(name)sHeldCount = 0;
    const held = [];
    window.hseshopLet%(name)sGo = () => {
      window.hseshop%(name)sHeld = false;
      held.splice(0).forEach((letGo) => letGo());
    };""" % {"name": name}, answer="""
    if (!window.hseshop%(name)sHeld || !(%(which)s)) return realFetch(input, init);
    const answer = %(answers)s ? await realFetch(input, init) : null;
    window.hseshop%(name)sHeldCount += 1;
    await new Promise((letGo) => held.push(letGo));
    return answer || realFetch(input, init);""" % {
        "name": name, "which": which, "answers": str(answers).lower()})


# Played by the browser itself: the page's reads of its first page of orders, held on their way
# while the test says so (_held_while_told).
FIRST_PAGES_HELD = _held_while_told("FirstPages", """path === "/api/orders" && method === "GET"
    && !new URL(url, location.href).searchParams.has("cursor")""")
ORDERS_PAGE = 50  # app.js ORDERS_PAGE, the orders a read of the list gives


def _orders_placed_and_settled(shopper: GatewayClient, count: int) -> None:
    """`count` orders of `shopper`'s, placed, and settled (the shopper has no account: each is
    cancelled)."""
    placed = {shopper.place_order("1")["id"] for _ in range(count)}

    def settled() -> bool:
        listed = shopper.api("GET", "/orders?limit=200", 200)["items"]
        return all(order["status"] != "NEW" for order in listed if order["id"] in placed)
    wait_for(settled, timeout=LIVE_DEADLINE + count / 5, interval=1, what="the orders settled")


def _a_page_more_placed_elsewhere_then_read(page, browser, shopper: GatewayClient,
                                            let_go: str) -> list[str]:
    """51 orders placed elsewhere (the API) while the page's reads are held, then let go (`let_go`,
    a script): the ids of all the shopper's orders, newest first, once the page shows the 50
    newest."""
    every = _orders_placed_elsewhere(shopper, ORDERS_PAGE + 1)
    assert len(every) == ORDERS_PAGE + 2
    browser.execute_script(let_go)
    page.wait_until(lambda: page.order_ids() == every[:ORDERS_PAGE], what="the newest orders read")
    return every


def _orders_placed_elsewhere(shopper: GatewayClient, count: int) -> list[str]:
    """`count` orders of `shopper`'s placed through the API; the ids of all theirs, newest
    first."""
    for _ in range(count):
        shopper.place_order("1")
    return [order["id"] for order in shopper.api("GET", "/orders?limit=200", 200)["items"]]


def _assert_shown_with_no_gap_and_paged_on(page: ShopPage, every: list[str]) -> None:
    """The page shows the newest of `every` (order ids, newest first) with none missing between,
    and all of them once Show older orders has been pressed until it is gone."""
    shown = page.order_ids()
    assert shown == every[:len(shown)], "a gap among the orders shown"
    assert _every_order_shown_with_show_older_orders(page) == every


def _every_order_shown_with_show_older_orders(page: ShopPage) -> list[str]:
    """The orders the page shows once Show older orders has been pressed until it is gone."""
    while page.visible("orders-more"):
        shown = len(page.order_ids())
        page.element("orders-more").click()
        page.wait_until(lambda: len(page.order_ids()) > shown, what="older orders shown")
    return page.order_ids()


def test_a_page_that_missed_more_orders_than_a_page_holds_shows_them_with_no_gap(stack, browser):
    """A page shows every one of its shopper's 51 orders (Show older orders pressed once); 51 more
    are placed elsewhere (another tab, the API, another device) while its reads of them are held
    on their way, so that the first page it reads again, at their notifications, holds 50 of them.
    The page then shows the newest orders with no gap, and Show older orders to page on: it showed
    the 50 above the 51 it had, the oldest new order left out for good, and no Show older orders.
    Paging on shows every order, newest first."""
    browser.execute_cdp_cmd("Page.addScriptToEvaluateOnNewDocument", {"source": FIRST_PAGES_HELD})
    shopper = GatewayClient(stack.gateway_url)
    _orders_placed_and_settled(shopper, ORDERS_PAGE + 1)
    page = ShopPage(browser, f"{stack.gateway_url}/").open()
    page.sign_in(shopper.username, "a long password")
    page.wait_until(lambda: len(page.order_ids()) == ORDERS_PAGE, what="the first page shown")
    assert len(_every_order_shown_with_show_older_orders(page)) == ORDERS_PAGE + 1

    browser.execute_script("window.hseshopFirstPagesHeld = true;")
    _orders_placed_and_settled(shopper, ORDERS_PAGE + 1)
    page.wait_until(lambda: browser.execute_script("return window.hseshopFirstPagesHeldCount;"),
                    timeout=LIVE_DEADLINE, what="a read of the orders a notification named")
    browser.execute_script("window.hseshopLetFirstPagesGo();")
    every = [order["id"] for order in shopper.api("GET", "/orders?limit=200", 200)["items"]]
    assert len(every) == 2 * (ORDERS_PAGE + 1)
    page.wait_until(lambda: page.order_ids()[:ORDERS_PAGE] == every[:ORDERS_PAGE],
                    what="the newest orders read")
    assert page.visible("orders-more")
    _assert_shown_with_no_gap_and_paged_on(page, every)


# Played by the browser itself: the page is never given a socket ticket (as with Redis away), so it
# reads its orders itself (its poll). Once window.hseshopFirstPagesCrossed is set, its next read of
# the first page of orders is held on its way to the gateway until the test sends it on
# (window.hseshopSendFirstRead()), and the answer to the one after it is held on its way back
# until the test lets it go (window.hseshopAnswerSecondRead()): the first read, asked first, reads
# the orders after the second. window.hseshopFirstPagesCrossedHeld counts the first held and the
# second answered. The rest is real.
FIRST_PAGES_CROSSED = _fetch_played(before="""
    window.hseshopFirstPagesCrossed = false;
    window.hseshopFirstPagesCrossedHeld = 0;
    let crossed = 0;
    const letGo = [];
    window.hseshopSendFirstRead = () => letGo[0]();
    window.hseshopAnswerSecondRead = () => letGo[1]();""", answer="""
    if (path === "/api/notifications/tickets") {
      return refusal(503, "NOTIFICATIONS_UNAVAILABLE", "Notifications are unavailable.");
    }
    const firstPage = !new URL(url, location.href).searchParams.has("cursor");
    if (path !== "/api/orders" || method !== "GET" || !firstPage
        || !window.hseshopFirstPagesCrossed || crossed === 2) {
      return realFetch(input, init);
    }
    const read = crossed++;
    const letThisGo = new Promise((go) => { letGo[read] = go; });
    if (read === 0) {
      window.hseshopFirstPagesCrossedHeld += 1;
      await letThisGo;
      return realFetch(input, init);
    }
    const answer = await realFetch(input, init);
    window.hseshopFirstPagesCrossedHeld += 1;
    await letThisGo;
    return answer;""")


def test_a_first_page_answered_from_older_orders_than_the_page_lists_leaves_no_gap(stack,
                                                                                   browser):
    """The gateway reads the orders when it handles a read, not when the page asks: the page's
    read after an order whose answer was lost is held on its way, its poll's read after it is
    answered at once, and its answer held; 51 orders are placed elsewhere (the API). The first
    read, sent on, has the 50 newest: the list starts again from them. The second's answer, from
    before those 51 were placed, comes after: it is not shown (it ended the list below the lost
    order with no Show older orders, the order between missing for good). Paging on shows every
    order, newest first."""
    speed_up_the_pages_clock(browser, HELD_READ_CLOCK_SPEEDUP)
    page, shopper = _shopper_with_100_on_the_page(stack, browser, ANSWERS_LOST_WHEN_TOLD,
                                                  FIRST_PAGES_CROSSED)
    held = "return window.hseshopFirstPagesCrossedHeld;"
    browser.execute_script("window.hseshopFirstPagesCrossed = true;")
    _answer_lost(page, _order(page, "1", "lost"), "The order for 1.00 may have been placed")
    page.wait_until(lambda: browser.execute_script(held) == 2, timeout=POLL_LATEST + PAGE_DEADLINE,
                    what="the page's read held and its poll's read answered")
    every = _a_page_more_placed_elsewhere_then_read(page, browser, shopper,
                                                    "window.hseshopSendFirstRead();")
    browser.execute_script("window.hseshopAnswerSecondRead();")
    # One more placed is shown by the poll's next read, asked after the second answer came.
    newest = shopper.place_order("1")["id"]
    page.wait_until(lambda: page.order_ids()[:1] == [newest], timeout=POLL_LATEST + PAGE_DEADLINE,
                    what="the poll's next read")
    _assert_shown_with_no_gap_and_paged_on(page, [newest, *every])


# Played by the browser itself: the answers to the orders the page places, held on their way back
# while the test says so (_held_while_told).
ORDER_ANSWERS_HELD = _held_while_told("OrderAnswers", 'path === "/api/orders" && method === "POST"',
                                      answers=True)


def test_an_order_answered_once_the_list_started_again_above_it_is_left_to_show_older_orders(
        stack, browser):
    """An order placed on the page is answered only after 51 more were placed elsewhere (the API)
    and the page read its first page again (held on its way, as on a slow link, until they were
    placed): the list started again from the 50 newest, and the order, older than them, is left
    to Show older orders (shown, it stood under the one placed between, missing). Paging on shows
    every order, newest first."""
    page, shopper = _shopper_with_100_on_the_page(stack, browser, FIRST_PAGES_HELD,
                                                  ORDER_ANSWERS_HELD)
    page.wait_until(lambda: page.element("live-status").get_attribute("data-state") == "live",
                    what="the page's socket open")
    browser.execute_script(
        "window.hseshopFirstPagesHeld = true; window.hseshopOrderAnswersHeld = true;")
    page.fill("order-amount", "1")
    page.element("order-submit").click()
    page.wait_until(lambda: browser.execute_script("return window.hseshopOrderAnswersHeldCount;")
                    and browser.execute_script("return window.hseshopFirstPagesHeldCount;"),
                    timeout=LIVE_DEADLINE, what="the order placed and a read its notification made")
    every = _a_page_more_placed_elsewhere_then_read(page, browser, shopper,
                                                    "window.hseshopLetFirstPagesGo();")
    browser.execute_script("window.hseshopLetOrderAnswersGo();")
    page.wait_until(lambda: "Order for 1.00 placed" in page.text("message"),
                    what="the order's answer")
    assert "Show older orders shows it" in page.text("message")
    _assert_shown_with_no_gap_and_paged_on(page, every)


# Played by the browser itself: the page's first attempt to tell the gateway of a sign-out gets
# no answer (the network drops it).
FIRST_SIGN_OUT_LOST = _fetch_played(before="window.hseshopSignOutsLost = 0;", answer="""
    if (path === "/api/auth/logout" && window.hseshopSignOutsLost === 0) {
      window.hseshopSignOutsLost += 1;
      throw new TypeError("Failed to fetch");
    }
    return realFetch(input, init);""")


def test_a_wrong_password_is_explained_and_signing_out_and_in_again_keeps_the_orders(
        stack, browser):
    """Signing out tells the gateway, which refuses the page's token from then on: told again
    when the first attempt got no answer."""
    browser.execute_cdp_cmd("Page.addScriptToEvaluateOnNewDocument",
                            {"source": FIRST_SIGN_OUT_LOST})
    page = ShopPage(browser, f"{stack.gateway_url}/").open()
    username = f"web_{uuid.uuid4().hex[:12]}"
    page.sign_up(username, PASSWORD)
    # Without an account an order is still taken, and cancelled for that reason: no error.
    order = page.place_order("5", "no account yet")
    page.wait_for_status(order, "CANCELLED")
    assert page.badge(order).get_attribute("data-reason") == "NO_ACCOUNT"

    # An amount over the services' largest is explained before anything is sent.
    page.fill("order-amount", "1000000000.01")
    page.element("order-submit").click()
    page.wait_until(lambda: page.visible("message")
                    and "at most 1,000,000,000" in page.text("message"), what="the amount refused")
    assert page.order_ids() == [order]
    page.fill("order-description", "typed, never sent")  # not left for whoever signs in next

    token = browser.execute_script(
        "return JSON.parse(sessionStorage.getItem('hseshop.session')).token")
    page.element("sign-out").click()
    page.wait_until(lambda: page.visible("auth-section"), what="the sign-in form")
    # The gateway was told: the page's token is refused from now on.
    wait_for(lambda: requests.get(f"{stack.gateway_url}/api/notifications/newest", timeout=5,
                                  headers={"Authorization": f"Bearer {token}"}).status_code == 401,
             timeout=10, what="the signed-out token to be refused")
    refused = requests.get(f"{stack.gateway_url}/api/notifications/newest", timeout=5,
                           headers={"Authorization": f"Bearer {token}"})
    assert refused.json()["error"]["code"] == "TOKEN_SIGNED_OUT"
    assert browser.execute_script("return window.hseshopSignOutsLost;") == 1
    assert not page.visible("message")
    assert [page.element(field).get_attribute("value") for field in (
        "order-amount", "order-description", "topup-amount")] == ["", "", ""]
    page.fill("username", username)
    page.fill("password", "not the password")
    page.element("sign-in").click()
    page.wait_until(lambda: page.visible("message")
                    and "Wrong username or password" in page.text("message"),
                    what="the wrong-password message")
    assert page.visible("auth-section")

    page.sign_in(username, PASSWORD)
    page.wait_until(lambda: page.order_ids() == [order], what="the earlier order")
    assert page.badge(order).get_attribute("data-status") == "CANCELLED"
    assert page.visible("no-account")


PASSWORD_FIELD = 'return document.getElementById("password").value;'


def test_the_password_leaves_the_page_once_signing_in_or_up_is_done_or_it_was_wrong(stack,
                                                                                   browser):
    """The password typed stayed in the sign-in form, hidden, for the whole session. It goes
    once signing up or in has succeeded, and when it was wrong (to be retyped); a sign-up refused
    for the username taken keeps it, so that Sign in needs no retyping."""
    page = ShopPage(browser, f"{stack.gateway_url}/").open()
    username = f"web_{uuid.uuid4().hex[:12]}"
    page.sign_up(username, PASSWORD)
    assert browser.execute_script(PASSWORD_FIELD) == ""
    page.element("sign-out").click()
    page.wait_until(lambda: page.visible("auth-section"), what="the sign-in form")

    page.fill("username", username)
    page.fill("password", "not the password")
    page.element("sign-in").click()
    page.wait_until(lambda: "Wrong username or password" in page.text("message"),
                    what="the wrong-password message")
    assert browser.execute_script(PASSWORD_FIELD) == ""

    page.fill("password", PASSWORD)
    page.element("sign-up").click()  # (signed up already)
    page.wait_until(lambda: "That username is taken" in page.text("message"),
                    what="the username-taken message")
    assert browser.execute_script(PASSWORD_FIELD) == PASSWORD
    page.element("sign-in").click()  # (as typed)
    page.wait_until(lambda: page.visible("shop-section"), what="the shop after signing in")
    assert browser.execute_script(PASSWORD_FIELD) == ""


def test_signing_out_everywhere_from_the_page_signs_out_the_users_other_devices(stack, browser):
    """A lost phone: from the page, every token of the user is refused, the phone's too, and the
    page is signed out and says so."""
    phone = GatewayClient(stack.gateway_url)  # signed up there: the phone's token
    page = ShopPage(browser, f"{stack.gateway_url}/").open()
    page.sign_in(phone.username, "a long password")
    page.element("sign-out-everywhere").click()
    page.wait_until(lambda: page.visible("auth-section")
                    and "Signed out on every device" in page.text("message"),
                    what="the page signed out, saying so")
    refused = phone.http.get(f"{stack.gateway_url}/api/accounts/balance", timeout=10)
    assert (refused.status_code, refused.json()["error"]["code"]) == (401, "TOKEN_SIGNED_OUT")


# Played by the browser itself: the first top-up and the first order reach the gateway, which
# carries them out, but their answers are lost on the way back (the network drops); the rest is
# real.
# The first top-up's answer replaced by the 502 the gateway gives for a service whose connection
# broke after the request went (it may have been carried out), the first order's lost on the way.
FIRST_ANSWERS_LOST = _fetch_played(before="const lost = new Set();", answer="""
    const response = await realFetch(input, init);
    if (method === "POST" && ["/api/orders", "/api/accounts/deposit"].includes(path)
        && !lost.has(path)) {
      lost.add(path);
      if (path === "/api/orders") throw new TypeError("Failed to fetch");
      return refusal(502, "BAD_GATEWAY", "The payments service failed to answer.");
    }
    return response;""")


def _top_up_maybe_through_then_retried(page: ShopPage, amount: str, balance: str,
                                       retyped: str | None = None) -> None:
    """Tops up `amount`, whose answer the page cannot trust: it says the top-up may have gone
    through and shows the balance read again (`balance`); then the same amount (typed as
    `retyped`) again, answered as a repeat, not counted again."""
    page.top_up(amount)
    page.wait_until(lambda: "may have gone through" in page.text("message"),
                    what="the page to say the top-up may have gone through")
    page.wait_until(lambda: page.text("balance") == balance, what="the balance read again")
    page.top_up_retried(retyped or amount)


def test_a_top_up_and_an_order_whose_answers_were_lost_count_once(stack, browser):
    """The top-up's answer lost: the page says it may have gone through and shows the balance as
    it is; the same amount typed another way is a retry, not a second top-up, and said to be one
    (the gateway's Idempotent-Replayed); a new amount is a new top-up. The order's answer
    lost: pressing again with the same form is a retry (the gateway's Idempotent-Replayed: placed
    already), not a second one; pressing once more places another. An amount typed with a
    decimal comma (a phone's keypad in a comma locale) is read as a point."""
    page, shopper = _live_page_of_a_shopper_with_100(stack, browser, FIRST_ANSWERS_LOST)

    _top_up_maybe_through_then_retried(page, "12,50", "112.50", retyped="12.5")
    page.top_up("001")  # said as the shop writes it
    page.wait_until(lambda: page.text("message") == "Topped up 1.00.", what="a new top-up")
    assert shopper.api("GET", "/accounts/balance", 200)["balance"] == "113.50"

    page.fill("order-amount", "10")
    page.element("order-submit").click()
    page.wait_until(lambda: "Cannot reach the shop" in page.text("message"),
                    what="the order's answer lost")
    (placed,) = page.wait_until(lambda: page.order_ids(), timeout=LIVE_DEADLINE,
                                what="the order, told of by its notification")
    page.wait_for_status(placed, "FINISHED")
    page.element("order-submit").click()  # the form as it was: a retry
    page.wait_until(lambda: "was placed already" in page.text("message"),
                    what="the retry answered with the order shown")
    assert page.order_ids() == [placed]
    page.element("order-submit").click()  # and once more: another order
    page.wait_until(lambda: len(page.order_ids()) == 2, timeout=LIVE_DEADLINE,
                    what="a second order")
    assert len(shopper.api("GET", "/orders", 200)["items"]) == 2
    page.wait_until(lambda: page.text("balance") == "93.50", timeout=LIVE_DEADLINE,
                    what="both orders paid, once each")


# Played by the browser itself: the first top-up answered with the gateway's 503 for a service it
# could not reach, never sent to it; the rest is real.
FIRST_TOP_UP_NEVER_SENT = _fetch_played(before="let refused = false;", answer="""
    if (path === "/api/accounts/deposit" && !refused) {
      refused = true;
      return refusal(503, "SERVICE_UNAVAILABLE",
                     "The payments service is unavailable; try again shortly.");
    }
    return realFetch(input, init);""")


def test_a_top_up_the_gateway_never_sent_is_not_said_to_have_maybe_gone_through(stack, browser):
    """The gateway's 503 SERVICE_UNAVAILABLE is for a service it never sent the request to (a
    connection broken after it went is a 502, over gRPC too): the page says the shop is not
    answering, not that the top-up may have gone through, and pressing again tops up once."""
    page, shopper = _live_page_of_a_shopper_with_100(stack, browser, FIRST_TOP_UP_NEVER_SENT)
    page.top_up("5")
    page.wait_until(lambda: "not answering right now" in page.text("message"),
                    what="the page to say the shop is not answering")
    assert "may have gone through" not in page.text("message")
    page.top_up("5")
    page.wait_until(lambda: page.text("message") == "Topped up 5.00.", what="the top-up")
    assert shopper.api("GET", "/accounts/balance", 200)["balance"] == "105.00"


# Played by the browser itself: while window.hseshopAnswersToLose is above 0, the answer to each
# top-up or order is lost on its way back (the network drops it; one a time, counted down, and
# counted up in window.hseshopAnswersLost), after the request reached the shop, which carried it
# out. The rest is real. (Run again on a reload: none lost until the test says so again.)
ANSWERS_LOST_WHEN_TOLD = _fetch_played(
    before="window.hseshopAnswersToLose = 0; window.hseshopAnswersLost = 0;", answer="""
    const response = await realFetch(input, init);
    if (method === "POST" && ["/api/orders", "/api/accounts/deposit"].includes(path)
        && window.hseshopAnswersToLose > 0) {
      window.hseshopAnswersToLose -= 1;
      window.hseshopAnswersLost += 1;
      throw new TypeError("Failed to fetch");
    }
    return response;""")
PENDING_KEYS_STORED = ("return Object.keys(sessionStorage)"
                       ".filter((name) => name.startsWith('hseshop.pending-keys.'));")


def _answer_lost(page: ShopPage, press, said: str) -> None:
    """Presses (`press`) with the next answer lost, and waits until the page says `said`."""
    lost = page.driver.execute_script(
        "window.hseshopAnswersToLose = 1; return window.hseshopAnswersLost;")
    press()
    page.wait_until(lambda: page.driver.execute_script("return window.hseshopAnswersLost;")
                    == lost + 1 and said in page.text("message"), what=f"the page to say {said}")


def _signed_in_again_and_lost_top_up_retried(page: ShopPage, shopper: GatewayClient,
                                             amount: str) -> None:
    """Signs `shopper` in again in the tab and tops up `amount` again, a top-up whose answer was
    lost: the page says it had gone through already, not counted again (retried under its key)."""
    page.sign_in(shopper.username, "a long password")
    page.wait_until(lambda: page.visible("topup-form"), what="the top-up form")
    page.top_up_retried(amount, what="the top-up retried after signing in again")


def _order(page: ShopPage, amount: str, description: str):
    def press() -> None:
        page.fill("order-amount", amount)
        page.fill("order-description", description)
        page.element("order-submit").click()
    return press


def test_a_lost_top_up_or_order_retried_after_others_is_carried_out_once(stack, browser):
    """Each attempt whose answer was lost keeps its key, whatever is sent after it: top up 100
    (lost), 50 (lost), then 100 again (typed "100.00") is a retry of the first, said to have gone
    through already, and the balance is 250.00, not 350.00; the same for 50. An order of "a book"
    (lost, and said to have maybe been placed), "a book!" (lost), then "a book" again is a retry:
    two orders, not three."""
    page, shopper = _live_page_of_a_shopper_with_100(stack, browser, ANSWERS_LOST_WHEN_TOLD)

    _answer_lost(page, lambda: page.top_up("100"), "The top-up of 100.00 may have gone through")
    _answer_lost(page, lambda: page.top_up("50"), "The top-up of 50.00 may have gone through")
    page.top_up_retried("100.00", what="the first top-up retried")
    page.top_up_retried("50", what="the second top-up retried")
    assert shopper.api("GET", "/accounts/balance", 200)["balance"] == "250.00"

    maybe_placed = ("The order for 10.00 may have been placed: the orders below are read again."
                    " Pressing Place order again with the same amount and description retries"
                    " that order; it is never placed twice.")
    _answer_lost(page, _order(page, "10", "a book"), maybe_placed)
    assert "Cannot reach the shop" in page.text("message")
    _answer_lost(page, _order(page, "10", "a book!"), maybe_placed)
    _order(page, "10", "a book")()
    page.wait_until(lambda: "That order for 10.00 was placed already" in page.text("message"),
                    what="the first order retried")
    placed = shopper.api("GET", "/orders", 200)["items"]
    assert sorted(order["description"] for order in placed) == ["a book", "a book!"]
    page.wait_until(lambda: len(page.order_ids()) == 2, what="both orders shown")


def test_a_lost_top_up_or_order_retried_after_a_reload_is_carried_out_once(stack, browser):
    """The keys of attempts whose answers were lost outlive a reload of the page (kept in the
    tab's sessionStorage): the same top-up and the same order pressed again after it are retries.
    And the Sign out button: the page said pressing again retries the top-up, never counting it
    twice, and so it does once its user signs in again in the tab (the button forgot the keys,
    and the same top-up pressed again was counted twice)."""
    page, shopper = _live_page_of_a_shopper_with_100(stack, browser, ANSWERS_LOST_WHEN_TOLD)
    _answer_lost(page, lambda: page.top_up("20"), "The top-up of 20.00 may have gone through")
    _answer_lost(page, _order(page, "5", "pen"), "The order for 5.00 may have been placed")

    browser.refresh()
    page.wait_until(lambda: page.visible("shop-section") and page.visible("topup-form"),
                    what="the shop after the reload")
    page.top_up_retried("20")
    _order(page, "5", "pen")()
    page.wait_until(lambda: "That order for 5.00 was placed already" in page.text("message"),
                    what="the order retried")
    assert [order["description"] for order in shopper.api("GET", "/orders", 200)["items"]] == [
        "pen"]
    # 100 and 20 topped up, 5 paid: once each.
    page.wait_until(lambda: page.text("balance") == "115.00", timeout=LIVE_DEADLINE,
                    what="the order paid")
    assert shopper.api("GET", "/accounts/balance", 200)["balance"] == "115.00"
    assert browser.execute_script(PENDING_KEYS_STORED) == []  # both settled

    _answer_lost(page, lambda: page.top_up("7"), "The top-up of 7.00 may have gone through")
    kept = [f"hseshop.pending-keys.{shopper.username}"]
    assert browser.execute_script(PENDING_KEYS_STORED) == kept
    page.element("sign-out").click()
    page.wait_until(lambda: page.visible("auth-section"), what="the sign-in form")
    assert browser.execute_script(PENDING_KEYS_STORED) == kept
    _signed_in_again_and_lost_top_up_retried(page, shopper, "7")
    assert shopper.api("GET", "/accounts/balance", 200)["balance"] == "122.00"
    assert browser.execute_script(PENDING_KEYS_STORED) == []


# The page's poll while its socket has not worked (app.js POLL_MS), the soonest and the latest its
# jitter puts each read, and how long a socket must stay open for the page to take it as working
# (SOCKET_WORKED_MS), in seconds.
POLL_SECONDS = 10
POLL_SOONEST, POLL_LATEST = 0.75 * POLL_SECONDS, 1.25 * POLL_SECONDS
SOCKET_WORKED_SECONDS = 5
# When a catch-up after a failed read reads again (app.js catchUpSoon: RECONNECT_MAX_MS / 2).
CATCH_UP_SECONDS = 5
# The longest a page waits to reconnect a socket turned away (app.js RECONNECT_TURNED_AWAY_MAX_MS),
# its jitter's latest.
RECONNECT_TURNED_AWAY_LATEST = 1.25 * 30

# Played by the browser itself: the page's reads (path, when) and its sockets (when each was made,
# opened, closed and with what code, and when each message came) are recorded; everything is
# real. window.hseshopDropSocket() closes the page's newest socket from the browser's end (the
# network lost, as the page sees it): the page reconnects as after any close.
READS_AND_SOCKETS_RECORDED = _fetch_played(before="window.hseshopReads = [];", answer="""
    window.hseshopReads.push({path, at: performance.now()});
    return realFetch(input, init);""") + """
window.hseshopSockets = [];
const socketsMade = [];
window.hseshopDropSocket = () => socketsMade.at(-1).close();
const RealWebSocket = window.WebSocket;
window.WebSocket = class extends RealWebSocket {
  constructor(...args) {
    super(...args);
    socketsMade.push(this);
    const socket = {created: performance.now(), opened: null, closed: null, code: null,
                    messages: []};
    window.hseshopSockets.push(socket);
    this.addEventListener("open", () => { socket.opened = performance.now(); });
    this.addEventListener("message", () => { socket.messages.push(performance.now()); });
    this.addEventListener("close", (event) => {
      socket.closed = performance.now();
      socket.code = event.code;
    });
  }
};
"""


def _every_socket_slot_of(shopper: GatewayClient) -> list[Listener]:
    """Sockets of `shopper` held open in every slot the gateway has for them (SOCKETS_PER_USER in
    each of its processes, whichever a connection lands in): it refuses the next with 1013."""
    def kept_open(_) -> Listener | None:
        listener = shopper.listen()
        try:
            listener.next(timeout=2)  # a refused one is closed at once
        except ConnectionClosed:
            return None
        if listener.socket.close_reason != CloseReason.NO_STATUS_RCVD:
            # Its close came with the handshake's answer: read, but the connection still open
            # (tests/network_tools.py WebSocketClient) until the gateway shuts it down.
            listener.close()
            return None
        return listener

    wanted, held = API_WORKERS * SOCKETS_PER_USER, []
    deadline = time.monotonic() + 60
    while len(held) < wanted:
        assert time.monotonic() < deadline, f"only {len(held)} of {wanted} sockets kept open"
        with ThreadPoolExecutor(wanted) as pool:
            held += [listener for listener in pool.map(kept_open, range(wanted - len(held)))
                     if listener]
    return held


def test_a_page_whose_socket_is_refused_reads_its_orders_itself_until_one_works(stack, browser):
    """The gateway refuses the page's socket (1013, every slot taken) for as long as it likes,
    while its API answers: the page reads the first page of orders and the balance itself every
    POLL_SECONDS or so, so an order paid meanwhile shows as paid, and the balance what it left.
    Once a socket works again, the page stops reading by itself."""
    speed_up_the_pages_clock(browser, CLOCK_SPEEDUP)
    browser.execute_cdp_cmd("Page.addScriptToEvaluateOnNewDocument",
                            {"source": READS_AND_SOCKETS_RECORDED})
    shopper = GatewayClient(stack.gateway_url)
    shopper.open_account_with("100")
    held = _every_socket_slot_of(shopper)
    try:
        page = ShopPage(browser, f"{stack.gateway_url}/").open()
        page.sign_in(shopper.username, "a long password")
        page.wait_until(lambda: page.text("balance") == "100.00", what="the balance")
        page.wait_until(lambda: any(socket["code"] == 1013 for socket in
                                    browser.execute_script("return window.hseshopSockets;")),
                        what="the page's socket refused with 1013")
        order = shopper.place_order("30")["id"]
        shopper.wait_until_final(order)
        page.wait_until(lambda: order in page.order_ids()
                        and page.badge(order).get_attribute("data-status") == "FINISHED",
                        timeout=POLL_LATEST + 5, what="the paid order read by the page's poll")
        page.wait_until(lambda: page.text("balance") == "70.00", what="the balance it left")
    finally:
        for listener in held:
            listener.close()

    def working_since() -> float | None:
        """When the page's socket that has stayed open SOCKET_WORKED_SECONDS opened."""
        sockets, now = browser.execute_script(
            "return [window.hseshopSockets, performance.now()];")
        last = sockets[-1]
        if last["opened"] is None or last["closed"] is not None:
            return None
        return last["opened"] if now - last["opened"] > SOCKET_WORKED_SECONDS * 1000 else None

    # (Reconnecting after 1013 backs off to 30 s at most between attempts.)
    opened = page.wait_until(working_since,
                             timeout=RECONNECT_TURNED_AWAY_LATEST + SOCKET_WORKED_SECONDS + 5,
                             what="a socket of the page working again")
    worked = opened + SOCKET_WORKED_SECONDS * 1000
    # A poll would read the orders within POLL_LATEST of any moment: none comes after it worked.
    page.wait_until(lambda: browser.execute_script("return performance.now();")
                    > worked + (POLL_LATEST + 2) * 1000, timeout=POLL_LATEST + 5,
                    what="a poll's time to pass")
    reads = browser.execute_script("return window.hseshopReads;")
    listed = [read["at"] for read in reads if read["path"] == "/api/orders"]
    # (A read sent as it began to work: 50 ms, on the page's clock.)
    assert not [at for at in listed if at > worked + 50 * CLOCK_SPEEDUP], (worked, listed)
    # While refused, the page read the orders no more often than every POLL_SOONEST.
    assert all(later - earlier >= POLL_SOONEST * 1000 - rounding_ms(CLOCK_SPEEDUP)
               for earlier, later in zip(listed, listed[1:])), listed



# Played by the browser itself: the page's requests for a socket ticket, held on their way while
# the test says so (_held_while_told): the page has no socket meanwhile, as on a network away.
TICKETS_HELD = _held_while_told("Tickets", 'path === "/api/notifications/tickets"')


def _prune_notifications_through(gateway_db, last: int) -> None:
    """Retention run on the shop's gateway database with every notification up to the id `last`
    (anyone's) past it, as beat's run would find them 30 days on."""
    with Session(gateway_db) as session, session.begin():
        session.execute(text("UPDATE notifications SET created_at = now() - interval '31 days'"
                             " WHERE id <= :last"), {"last": last})
        cutoff = session.scalar(text("SELECT now() - interval '30 days'"))
        assert notifications.prune_old_notifications(session, cutoff, 1_000_000) >= 1


# Played by the browser itself: while window.hseshopNewestRefused is set, the page's reads of the
# newest notification's id are answered as a gateway answers one it cannot serve a moment (503).
NEWEST_REFUSED = _fetch_played(before="window.hseshopNewestRefused = false;", answer="""
    if (window.hseshopNewestRefused && path === "/api/notifications/newest") {
      return refusal(503, "SERVICE_UNAVAILABLE", "Not now.", {});
    }
    return realFetch(input, init);""")


def test_a_page_told_it_missed_pruned_notifications_reads_its_state_again(stack, browser,
                                                                          gateway_db):
    """The page's socket away (its tickets held), an order placed elsewhere is paid, and its
    notification pruned before the socket is back: the socket, opened after an id older than the
    one pruned, says NotificationsMissed, and the page reads its orders and balance again at once
    (before, it went on from what was left as if nothing was missing). Its next socket, opened
    after the newest pruned (the message's `through`), is not told again, though every read of
    the newest id is refused meanwhile (503): before, the page went on after the id that read
    gave, and a read refused left each reconnect told again, and reading all again."""
    page, elsewhere = _shopper_with_100_on_the_page(stack, browser, READS_AND_SOCKETS_RECORDED,
                                                    TICKETS_HELD, NEWEST_REFUSED)
    page.wait_until(lambda: page.element("live-status").get_attribute("data-state") == "live",
                    what="the page's socket open")

    def recorded() -> tuple[list[dict], list[dict]]:
        return browser.execute_script("return [window.hseshopSockets, window.hseshopReads];")

    browser.execute_script("window.hseshopTicketsHeld = true;"
                           " window.hseshopDropSocket();")  # (its socket lost)
    page.wait_until(lambda: browser.execute_script("return window.hseshopTicketsHeldCount;"),
                    what="the next socket's ticket held")
    order = elsewhere.place_order("30")["id"]
    elsewhere.wait_until_final(order)
    with gateway_db.connect() as connection:
        paid = wait_for(lambda: connection.execute(text(
            "SELECT max(id) FROM notifications WHERE user_id = :user"),
            {"user": elsewhere.user_id}).scalar(), timeout=LIVE_DEADLINE,
            what="the paid order's notification kept")
    _prune_notifications_through(gateway_db, paid)

    sockets_before = len(recorded()[0])
    browser.execute_script("window.hseshopNewestRefused = true; window.hseshopLetTicketsGo();")
    told_at = page.wait_until(lambda: next((socket["messages"][0] for socket in
                                            recorded()[0][sockets_before:]
                                            if socket["messages"]), None),
                              timeout=LIVE_DEADLINE, what="the new socket's first message")

    def read_again() -> bool:
        """Whether the page, told, has read its orders and balance."""
        reads = [read for read in recorded()[1] if read["at"] >= told_at]
        return all(any(read["path"] == path for read in reads)
                   for path in ("/api/orders", "/api/accounts/balance"))
    page.wait_until(read_again, timeout=PAGE_DEADLINE, what="the orders and the balance read again")
    page.wait_for_status(order, "FINISHED")
    page.wait_until(lambda: page.text("balance") == "70.00", what="the balance it left")

    newest_reads = len([read for read in recorded()[1]
                        if read["path"] == "/api/notifications/newest"])
    sockets_before = len(recorded()[0])
    browser.execute_script("window.hseshopDropSocket();")  # its next socket
    page.wait_until(lambda: any(socket["opened"] for socket in recorded()[0][sockets_before:]),
                    timeout=LIVE_DEADLINE, what="the next socket open")
    later = elsewhere.place_order("20")["id"]
    page.wait_for_status(later, "FINISHED")
    sockets, reads = recorded()
    assert [len(socket["messages"]) for socket in sockets[sockets_before:]
            if socket["opened"]] == [1], sockets  # the new order's notification alone
    assert len([read for read in reads
                if read["path"] == "/api/notifications/newest"]) == newest_reads, reads


# Played by the browser itself, over READS_AND_SOCKETS_RECORDED: once armed
# (window.hseshopRefuseNextRead), the page's next read is answered as the gateway answers a user
# past the rate limit, Retry-After RETRY_AFTER_SECONDS (or window.hseshopRetryAfter, if the test
# sets it), and when it was, and its path, are kept (window.hseshopRefusedAt, RefusedPath); the
# rest is real. (Played on the page, a longer one costs nothing of the shop's: 12 s, 4 s real at
# RACING_CLOCK_SPEEDUP, for a test's own steps to fall within, a machine busy or not.)
RETRY_AFTER_SECONDS = 12
NEXT_READ_RATE_LIMITED = _fetch_played(
    before="window.hseshopRefuseNextRead = false; window.hseshopRefusedAt = null;"
           " window.hseshopRetryAfter = %d;" % RETRY_AFTER_SECONDS, answer="""
    if (window.hseshopRefuseNextRead && method === "GET") {
      window.hseshopRefuseNextRead = false;
      window.hseshopRefusedAt = performance.now();
      window.hseshopRefusedPath = path;
      return refusal(429, "RATE_LIMITED", "Too many requests.",
                     {"Retry-After": String(window.hseshopRetryAfter)});
    }
    return realFetch(input, init);""")


def test_a_page_told_to_wait_reads_nothing_and_opens_no_socket_until_then(stack, browser):
    """The balance's read after a top-up is answered 429, Retry-After RETRY_AFTER_SECONDS: until
    then the page sends no read (the next top-up's read is refused on the page, unsent) and opens
    no socket (its socket lost and the network back, it would open one at once), and says nothing
    of either (each top-up's own message stays); then it reads the orders and the balance again,
    and opens it. (The second top-up and the network back race the pause, on the page's clock:
    both must fall within it, or the test would prove nothing.)"""
    speed_up_the_pages_clock(browser, RACING_CLOCK_SPEEDUP)
    browser.execute_cdp_cmd("Page.addScriptToEvaluateOnNewDocument",
                            {"source": READS_AND_SOCKETS_RECORDED})
    page, _shopper = _live_page_of_a_shopper_with_100(stack, browser, NEXT_READ_RATE_LIMITED)
    browser.execute_script("window.hseshopRefuseNextRead = true;")
    page.top_up("5")
    page.wait_until(lambda: browser.execute_script("return window.hseshopRefusedAt;") is not None,
                    what="the top-up's read of the balance, refused")
    page.wait_until(lambda: page.text("message") == "Topped up 5.00.", what="the top-up's message")
    page.top_up("7")  # (during the pause)
    page.wait_until(lambda: page.text("balance") == "112.00", what="the second top-up's answer")
    assert page.text("message") == "Topped up 7.00."
    sockets_before = len(browser.execute_script("return window.hseshopSockets;"))
    online_at = browser.execute_script(  # a new socket, now
        'const at = performance.now(); window.hseshopDropSocket();'
        ' window.dispatchEvent(new Event("online")); return at;')

    refused_at = browser.execute_script("return window.hseshopRefusedAt;")
    ends = refused_at + RETRY_AFTER_SECONDS * 1000
    # (The second top-up was answered before: its read, too, fell within the pause.)
    assert online_at < ends - 1000, ("the network back too late", refused_at, online_at)

    def sockets_and_reads_after_the_pause():
        sockets, reads = browser.execute_script(
            "return [window.hseshopSockets, window.hseshopReads];")
        listed = [read for read in reads if read["at"] > ends - rounding_ms(RACING_CLOCK_SPEEDUP)
                  and read["path"] in ("/api/orders", "/api/accounts/balance")]
        return (sockets, reads) if len(sockets) > sockets_before and len(listed) >= 2 else None

    sockets, reads = page.wait_until(sockets_and_reads_after_the_pause,
                                     timeout=RETRY_AFTER_SECONDS + 5,
                                     what="the page reading again, and its socket opened")
    early = rounding_ms(RACING_CLOCK_SPEEDUP)
    assert not [read for read in reads if refused_at < read["at"] < ends - early
                and read["path"] != "/api/accounts/deposit"], (refused_at, reads)
    assert all(socket["created"] > ends - early for socket in sockets[sockets_before:]), (
        refused_at, sockets)
    assert page.text("message") == "Topped up 7.00."
    page.wait_until(lambda: page.element("live-status").get_attribute("data-state") == "live",
                    what="the page's socket open again")


def _refused_next_read(browser, retry_after: int) -> None:
    """Arms NEXT_READ_RATE_LIMITED: the page's next read refused, Retry-After `retry_after`."""
    browser.execute_script("window.hseshopRetryAfter = arguments[0];"
                           " window.hseshopRefuseNextRead = true;", retry_after)


def _refused_at(page: ShopPage, since: float | None = None) -> float:
    """When NEXT_READ_RATE_LIMITED refused the page's read (one after `since`), once it has."""
    def refused() -> float | None:
        at = page.driver.execute_script("return window.hseshopRefusedAt;")
        return at if at is not None and (since is None or at > since) else None
    return page.wait_until(refused, timeout=LIVE_DEADLINE, what="the page's read, refused")


def test_reads_a_notification_and_the_catch_up_make_while_the_page_waits_say_nothing(stack,
                                                                                      browser):
    """The balance's read after a top-up is answered 429, Retry-After 10: an order placed
    elsewhere is paid meanwhile, and the read of it its notification makes, refused on the page,
    unsent, says nothing (the top-up's own message stays: the catch-up reads it once the pause is
    over); nor does the catch-up's read, refused by the gateway in turn (Retry-After 3). The
    catch-up after that shows the order paid and the balance it left. (The order's payment and
    its notification, some 1 to 2 s, race the pause of 10 s: the page's clock runs twice as fast
    only.)"""
    speedup = PAYMENT_RACING_CLOCK_SPEEDUP
    speed_up_the_pages_clock(browser, speedup)
    browser.execute_cdp_cmd("Page.addScriptToEvaluateOnNewDocument",
                            {"source": READS_AND_SOCKETS_RECORDED})
    page, elsewhere = _live_page_of_a_shopper_with_100(stack, browser, NEXT_READ_RATE_LIMITED)
    pause_seconds = 10
    _refused_next_read(browser, pause_seconds)
    page.top_up("5")
    refused_at = _refused_at(page)
    page.wait_until(lambda: page.text("message") == "Topped up 5.00.", what="the top-up's message")
    ends = refused_at + pause_seconds * 1000
    _refused_next_read(browser, 3)  # the next read sent: the catch-up's, once the pause is over
    (socket,) = browser.execute_script("return window.hseshopSockets;")

    order = elsewhere.place_order("30")["id"]
    told_at = page.wait_until(
        lambda: (messages := browser.execute_script(
            "return window.hseshopSockets[0].messages;")[len(socket["messages"]):]) and messages[0],
        timeout=LIVE_DEADLINE, what="the paid order's notification")
    assert told_at < ends - 1000, "the notification came after the pause: nothing was tried"
    time.sleep(0.5)  # (nothing is to show: the order's read, refused on the page, says nothing)
    assert page.text("message") == "Topped up 5.00."

    again_at = _refused_at(page, since=refused_at)  # the catch-up's
    assert again_at > ends - rounding_ms(speedup), (refused_at, again_at)
    page.wait_for_status(order, "FINISHED")
    page.wait_until(lambda: page.text("balance") == "75.00", timeout=LIVE_DEADLINE,
                    what="the balance the order left")
    assert page.text("message") == "Topped up 5.00."
    reads = browser.execute_script("return window.hseshopReads;")
    assert not [read for read in reads if refused_at < read["at"] < ends - rounding_ms(speedup)
                and read["path"] != "/api/accounts/deposit"], (refused_at, reads)


def test_opening_an_account_opened_already_while_the_page_waits_shows_it_after_the_wait(
        stack, browser):
    """An account opened elsewhere, the page paused (the balance's read after an order's
    notification answered 429): Open account is answered ACCOUNT_EXISTS, and the read of the
    balance that follows, refused on the page, says nothing of the limit (the page says the
    account exists) and is made once the pause is over, the account then shown. (The press
    races the pause, on the page's clock.)"""
    speed_up_the_pages_clock(browser, RACING_CLOCK_SPEEDUP)
    for script in (READS_AND_SOCKETS_RECORDED, NEXT_READ_RATE_LIMITED):
        browser.execute_cdp_cmd("Page.addScriptToEvaluateOnNewDocument", {"source": script})
    shopper = GatewayClient(stack.gateway_url)
    page = ShopPage(browser, f"{stack.gateway_url}/").open()
    page.sign_in(shopper.username, "a long password")
    page.wait_until(lambda: page.visible("open-account"), what="the open-account button")
    shopper.api("POST", "/accounts", 201)
    _refused_next_read(browser, RETRY_AFTER_SECONDS)
    order = page.place_order("5", "a pen")
    page.wait_for_status(order, "CANCELLED")  # (the account empty)
    refused_at = _refused_at(page)
    ends = refused_at + RETRY_AFTER_SECONDS * 1000
    page.element("open-account").click()
    page.wait_until(lambda: page.text("message") == "You already have an account.",
                    what="the page to say the account exists")
    assert browser.execute_script("return performance.now();") < ends - 1000, "pressed too late"
    page.wait_until(lambda: page.visible("topup-form") and page.text("balance") == "0.00",
                    timeout=RETRY_AFTER_SECONDS + 5, what="the account shown after the pause")
    assert page.text("message") == "You already have an account."
    reads = browser.execute_script("return window.hseshopReads;")
    early = rounding_ms(RACING_CLOCK_SPEEDUP)
    assert not [read for read in reads if refused_at < read["at"] < ends - early
                and read["path"] != "/api/accounts"], (refused_at, reads)

# Played by the browser itself, over READS_AND_SOCKETS_RECORDED: once armed
# (window.hseshopProxyRefuses = "GET" or "POST"), the page's next request of that method is
# answered as a proxy or load balancer in front of the gateway answers one past a limit of its
# own: 429, an HTML body (no gateway error code), Retry-After RETRY_AFTER_SECONDS; when it was is
# kept (window.hseshopProxyRefusedAt). The rest is real.
PROXY_RATE_LIMITS_WHEN_TOLD = _fetch_played(
    before="window.hseshopProxyRefuses = null; window.hseshopProxyRefusedAt = null;", answer="""
    if (window.hseshopProxyRefuses === method) {
      window.hseshopProxyRefuses = null;
      window.hseshopProxyRefusedAt = performance.now();
      return new Response("<html><body><h1>429 Too Many Requests</h1></body></html>", {
        status: 429, statusText: "TOO MANY REQUESTS",
        headers: {"Content-Type": "text/html", "Retry-After": "%d"}});
    }
    return realFetch(input, init);""" % RETRY_AFTER_SECONDS)


def _proxy_refused_at(page: ShopPage, since: float | None = None) -> float:
    """When PROXY_RATE_LIMITS_WHEN_TOLD refused the page's request (one after `since`)."""
    def refused() -> float | None:
        at = page.driver.execute_script("return window.hseshopProxyRefusedAt;")
        return at if at is not None and (since is None or at > since) else None
    return page.wait_until(refused, timeout=LIVE_DEADLINE, what="the page's request, refused")


def test_a_429_from_a_proxy_in_front_of_the_gateway_is_a_rate_limit_too(stack, browser):
    """A 429 a proxy or load balancer answers (an HTML body, no gateway error code) was taken
    for a failure of its own: the top-up's read of the balance it refused overwrote the top-up's
    message with "TOO MANY REQUESTS" (a read the page makes of itself says nothing when rate
    limited), and a top-up it refused said so, with no wait. Now any 429 is a rate limit: the read
    says nothing, none is sent until its Retry-After has passed, the catch-up then reads the
    balance, and a refused top-up says to try again in its Retry-After. (The steps race the
    pause, on the page's clock.)"""
    speed_up_the_pages_clock(browser, RACING_CLOCK_SPEEDUP)
    browser.execute_cdp_cmd("Page.addScriptToEvaluateOnNewDocument",
                            {"source": READS_AND_SOCKETS_RECORDED})
    page, shopper = _live_page_of_a_shopper_with_100(stack, browser, PROXY_RATE_LIMITS_WHEN_TOLD)
    browser.execute_script('window.hseshopProxyRefuses = "GET";')
    page.top_up("5")  # its read of the balance after it, refused
    refused_at = _proxy_refused_at(page)
    page.wait_until(lambda: page.text("message") == "Topped up 5.00.", what="the top-up's message")
    ends = refused_at + RETRY_AFTER_SECONDS * 1000
    shopper.api("POST", "/accounts/deposit", 200, json={"amount": "10"})  # (the catch-up shows it)
    time.sleep(0.5)  # (nothing is to show: the read refused says nothing)
    assert page.text("message") == "Topped up 5.00."
    assert browser.execute_script("return performance.now();") < ends - 1000, "too slow a check"
    page.wait_until(lambda: page.text("balance") == "115.00", timeout=RETRY_AFTER_SECONDS + 5,
                    what="the balance read once the wait is over")
    assert page.text("message") == "Topped up 5.00."
    reads = browser.execute_script("return window.hseshopReads;")
    early = rounding_ms(RACING_CLOCK_SPEEDUP)
    assert not [read for read in reads if refused_at < read["at"] < ends - early
                and read["path"] != "/api/accounts/deposit"], (refused_at, reads)

    browser.execute_script('window.hseshopProxyRefuses = "POST";')
    page.top_up("7")
    _proxy_refused_at(page, since=refused_at)
    page.wait_until(lambda: page.text("message")
                    == f"Too many requests. Try again in {RETRY_AFTER_SECONDS} s.",
                    what="the refused top-up's message")
    assert page.text("balance") == "115.00"


# Played by the browser itself, over READS_AND_SOCKETS_RECORDED: the page's next POST, once
# told (window.hseshopProxyRefusesWithDate = {clockAheadMs, retryAfterSeconds}), refused by a proxy
# in front of the gateway whose clock is clockAheadMs ahead of the page's, its Retry-After an
# HTTP-date retryAfterSeconds ahead of its clock, and its answer's Date the time by it (none, where
# clockAheadMs is null). Whole seconds, as the dates are written: the two are retryAfterSeconds
# apart, to the second.
PROXY_RATE_LIMITS_WITH_A_DATE = _fetch_played(
    before="window.hseshopProxyRefusesWithDate = null; window.hseshopProxyRefusedAt = null;",
    answer="""
    if (window.hseshopProxyRefusesWithDate && method === "POST") {
      const {clockAheadMs, retryAfterSeconds} = window.hseshopProxyRefusesWithDate;
      window.hseshopProxyRefusesWithDate = null;
      window.hseshopProxyRefusedAt = performance.now();
      const now = Date.now() + (clockAheadMs || 0);
      const headers = {"Content-Type": "text/html",
                       "Retry-After": new Date(now + retryAfterSeconds * 1000).toUTCString()};
      if (clockAheadMs !== null) headers.Date = new Date(now).toUTCString();
      return new Response("<html><body><h1>429 Too Many Requests</h1></body></html>", {
        status: 429, statusText: "TOO MANY REQUESTS", headers});
    }
    return realFetch(input, init);""")
HOURS_3_MS = 3 * 60 * 60 * 1000


@pytest.mark.parametrize("clock_ahead_ms, retry_after_seconds, said_seconds", [
    (None, 20, {19, 20}),      # no Date: from the answer's coming, by the page's clock
    (HOURS_3_MS, 20, {20}),    # the page's clock 3 h slow: it waited 3 h more before
    (-HOURS_3_MS, 20, {20}),   # the page's clock 3 h fast: it did not wait at all before
    (0, 60 * 60, {5 * 60}),    # an hour: 5 minutes at most (app.js RETRY_AFTER_DATE_MAX_MS)
], ids=["no-date", "page-clock-3h-slow", "page-clock-3h-fast", "an-hour-capped"])
def test_a_429_whose_retry_after_is_a_date_says_the_seconds_and_pauses_the_page(
        stack, browser, clock_ahead_ms, retry_after_seconds, said_seconds):
    """A proxy's Retry-After may be an HTTP-date: the page said "Try again in Wed, 09 Dec 2026
    10:00:00 GMT s." and set no pause (a read went at once). Now the wait is the time until the
    date: the message says its seconds, and no read is sent meanwhile (the window focused, a
    live page reads the balance, but not while paused). Measured from the answer's Date, where it
    has one, not by the page's clock: a page's clock 3 h slow waited 3 h more (every read and
    socket stopped), one 3 h fast none. And no longer than 5 minutes, whatever the date."""
    page, _shopper = _shopper_with_100_on_the_page(stack, browser, READS_AND_SOCKETS_RECORDED,
                                                   PROXY_RATE_LIMITS_WITH_A_DATE)
    page.wait_until(  # (its socket working: a live page's own reads stopped)
        lambda: browser.execute_script(
            "const opened = window.hseshopSockets[0]?.opened;"
            " return opened != null && performance.now() > opened + %d;"
            % (SOCKET_WORKED_SECONDS * 1000 + 200)),
        timeout=PAGE_DEADLINE + SOCKET_WORKED_SECONDS, what="the page's socket working")
    browser.execute_script("window.hseshopProxyRefusesWithDate = arguments[0];",
                           {"clockAheadMs": clock_ahead_ms,
                            "retryAfterSeconds": retry_after_seconds})
    page.top_up("5")
    refused_at = _proxy_refused_at(page)
    said = {f"Too many requests. Try again in {seconds} s." for seconds in said_seconds}
    page.wait_until(lambda: page.text("message") in said, what="the refused top-up's message")
    browser.execute_script('window.dispatchEvent(new Event("focus"));')
    time.sleep(1)  # (a read would be sent at once: nothing is to show)
    reads = browser.execute_script("return window.hseshopReads;")
    assert not [read for read in reads if read["at"] > refused_at
                and read["path"] == "/api/accounts/balance"], (refused_at, reads)
    assert page.text("balance") == "100.00"


# Played by the browser itself, over READS_AND_SOCKETS_RECORDED: the page's first request for a
# socket ticket is answered as the gateway answers one whose address has spent its socket
# handshakes, Retry-After HANDSHAKES_RETRY_AFTER_SECONDS, its second as with Redis away (503,
# Retry-After 5); the rest are real. When each was asked, and each socket's URL, are kept.
HANDSHAKES_RETRY_AFTER_SECONDS = 12  # (4 s real at RACING_CLOCK_SPEEDUP, for the top-up)
TICKETS_REFUSED_FIRST = _fetch_played(before="""
    window.hseshopTickets = [];
    window.hseshopSocketUrls = [];
    const UrlRecordedWebSocket = window.WebSocket;
    window.WebSocket = class extends UrlRecordedWebSocket {
      constructor(url, ...rest) {
        super(url, ...rest);
        window.hseshopSocketUrls.push(String(url));
      }
    };""", answer="""
    if (path === "/api/notifications/tickets") {
      const asked = window.hseshopTickets.length;
      window.hseshopTickets.push(performance.now());
      const refusals = [[429, "SOCKET_HANDSHAKES_LIMITED", "%d"],
                        [503, "NOTIFICATIONS_UNAVAILABLE", "5"]];
      if (asked < refusals.length) {
        const [status, code, retryAfter] = refusals[asked];
        return refusal(status, code, "Not now.", {"Retry-After": retryAfter});
      }
    }
    return realFetch(input, init);""" % HANDSHAKES_RETRY_AFTER_SECONDS)


def test_a_page_opens_each_socket_with_a_ticket_of_its_own_and_waits_as_a_refusal_says(
        stack, browser):
    """The token is never written in a socket's URL (proxies log URLs): each (re)connect asks for
    a ticket and opens its socket with it. A ticket refused for the address's socket handshakes
    (429 SOCKET_HANDSHAKES_LIMITED) puts off the socket until its Retry-After, where a handshake
    refused 429 would have told the page nothing, the network coming back online meanwhile too
    (it asked for a ticket at once), but not the page's reads (the user's own limit is not spent:
    a top-up's read of the balance goes at once); one refused with Redis away (503) is asked for
    again later, no socket tried meanwhile. The network back online leaves an open socket open
    (it closed it, and spent a handshake on another). (The top-up and the network back race the
    first refusal's wait, on the page's clock.)"""
    speed_up_the_pages_clock(browser, RACING_CLOCK_SPEEDUP)
    page, shopper = _shopper_with_100_on_the_page(stack, browser, READS_AND_SOCKETS_RECORDED,
                                                  TICKETS_REFUSED_FIRST)
    page.wait_until(lambda: browser.execute_script("return window.hseshopTickets.length;")
                    and page.element("live-status").get_attribute("data-state") == "reconnecting",
                    what="the first ticket refused")
    browser.execute_script('window.dispatchEvent(new Event("online"));')  # (not a socket yet)
    page.top_up("5")
    page.wait_until(lambda: page.element("live-status").get_attribute("data-state") == "live",
                    timeout=HANDSHAKES_RETRY_AFTER_SECONDS + 5 + 10, what="the page's socket open")
    assert page.text("balance") == "105.00"
    browser.execute_script('window.dispatchEvent(new Event("online"));')  # (its socket kept)
    time.sleep(1)  # (a new socket would be asked for at once: nothing is to show)
    assert len(browser.execute_script("return window.hseshopTickets;")) == 3
    assert page.element("live-status").get_attribute("data-state") == "live"
    browser.execute_script("window.hseshopDropSocket();")  # a new socket, now

    def reconnected():
        urls = browser.execute_script("return window.hseshopSocketUrls;")
        live = page.element("live-status").get_attribute("data-state") == "live"
        return urls if len(urls) == 2 and live else None

    urls = page.wait_until(reconnected, what="the page's socket opened again")
    tickets, sockets, reads = browser.execute_script(
        "return [window.hseshopTickets, window.hseshopSockets, window.hseshopReads];")
    assert len(tickets) == 4, tickets  # two refused, one for each socket
    refused_at, ends = tickets[0], tickets[0] + HANDSHAKES_RETRY_AFTER_SECONDS * 1000
    early = rounding_ms(RACING_CLOCK_SPEEDUP)
    assert tickets[1] > ends - early and tickets[2] > tickets[1] + 5000 - early, tickets
    assert len(sockets) == 2 and sockets[0]["created"] > tickets[2], (tickets, sockets)
    assert [read for read in reads if refused_at < read["at"] < ends
            and read["path"] == "/api/accounts/balance"], (refused_at, reads)
    given = [parse_qs(urlsplit(url).query) for url in urls]
    assert all(set(query) == {"ticket", "after"} for query in given), urls
    assert given[0]["ticket"] != given[1]["ticket"]
    assert shopper.token not in " ".join(urls)


# Played by the browser itself, over READS_AND_SOCKETS_RECORDED: the page's first socket is opened
# at a path of the gateway's that is none (its handshake answered 404: turned away, never opened,
# as one refused 429 is to a browser); the rest are real.
FIRST_SOCKET_TURNED_AWAY = """
(() => {
  const SocketMade = window.WebSocket;
  let made = 0;
  window.WebSocket = class extends SocketMade {
    constructor(url, ...rest) {
      super(made++ === 0 ? `ws://${location.host}/api/no-such-socket` : url, ...rest);
    }
  };
})();
"""


def test_the_network_back_online_reconnects_a_socket_turned_away_no_sooner_than_its_back_off(
        stack, browser):
    """The network back online (the `online` event) dropped the back-off after a socket turned
    away (its handshake refused) and opened another at once, spending one more of the address's
    handshakes: now the reconnect waits for its back-off (0.375 s at the soonest, jittered), the
    event coming within it. (The page's clock not sped up: the back-off is short.)"""
    browser.execute_cdp_cmd("Page.addScriptToEvaluateOnNewDocument",
                            {"source": READS_AND_SOCKETS_RECORDED})
    page, _shopper = _shopper_with_100_on_the_page(stack, browser, FIRST_SOCKET_TURNED_AWAY)
    closed_at = page.wait_until(
        lambda: browser.execute_script("return window.hseshopSockets[0]?.closed;"),
        what="the first socket turned away")
    online_at = browser.execute_script(
        'const at = performance.now(); window.dispatchEvent(new Event("online")); return at;')
    assert online_at < closed_at + 300, ("the network back too late", closed_at, online_at)
    page.wait_until(lambda: page.element("live-status").get_attribute("data-state") == "live",
                    what="the page's socket open")
    sockets, reads = browser.execute_script(
        "return [window.hseshopSockets, window.hseshopReads];")
    assert len(sockets) == 2 and sockets[0]["opened"] is None, sockets
    tickets = [read["at"] for read in reads if read["path"] == "/api/notifications/tickets"]
    assert len(tickets) == 2 and tickets[1] >= closed_at + 375 - rounding_ms(1), (
        closed_at, tickets)


def test_the_network_back_after_going_away_replaces_the_open_socket_but_not_otherwise(stack,
                                                                                        browser):
    """A socket open when the network went away (the `offline` event) was kept when it came
    back (`online`), taken as open: after a Wi-Fi switch or a new address its connection may be
    dead and still look open for minutes (the page sends nothing of its own to find out), the
    page "live", no poll made, a paid order NEW for as long. Now it is replaced at once; an open
    socket with no `offline` before the `online` is kept. (The page's clock not sped up.)"""
    page, shopper = _live_page_of_a_shopper_with_100(stack, browser, READS_AND_SOCKETS_RECORDED)
    browser.execute_script('window.dispatchEvent(new Event("online"));')  # (its socket kept)
    time.sleep(1)  # (a new socket would be asked for at once: nothing is to show)
    assert len(browser.execute_script("return window.hseshopSockets;")) == 1
    went_at = browser.execute_script(
        'const at = performance.now(); window.dispatchEvent(new Event("offline"));'
        ' window.dispatchEvent(new Event("online")); return at;')

    def replaced():
        sockets = browser.execute_script("return window.hseshopSockets;")
        live = page.element("live-status").get_attribute("data-state") == "live"
        return sockets if len(sockets) == 2 and live else None

    sockets = page.wait_until(replaced, what="the page's socket replaced")
    assert sockets[0]["closed"] is not None and sockets[1]["created"] > went_at, sockets
    paid = shopper.place_order("30")["id"]
    page.wait_for_status(paid, "FINISHED")
    # Told over the new socket (its one message: it was opened after the last id the page had
    # seen), and over the one replaced nothing.
    sockets = page.wait_until(
        lambda: (sockets := browser.execute_script("return window.hseshopSockets;"))[1]["messages"]
        and sockets, what="the paid order's notification over the new socket")
    assert [len(socket["messages"]) for socket in sockets] == [0, 1], sockets
    browser.execute_script('window.dispatchEvent(new Event("online"));')  # (no `offline`: kept)
    time.sleep(1)
    assert len(browser.execute_script("return window.hseshopSockets;")) == 2


# Run in the page: the tab taken as hidden (document.hidden) or shown again, as the page sees it.
TAB_HIDDEN = ('Object.defineProperty(document, "hidden", {configurable: true, get: () => true});'
              ' document.dispatchEvent(new Event("visibilitychange"));')
TAB_SHOWN = ('Object.defineProperty(document, "hidden", {configurable: true, get: () => false});'
             ' document.dispatchEvent(new Event("visibilitychange"));')


def test_the_network_back_opens_no_socket_in_a_hidden_tab_until_it_is_shown(stack, browser):
    """A hidden tab opens no socket (no one is looking, and each handshake counts against the
    address's): its reconnect falls due and waits for the tab to be shown. The network back
    online (`online`) with its reconnect pending, or its open socket to be replaced after an
    `offline`, asked for a ticket and opened a socket in the hidden tab at once; now the socket
    is made once the tab is shown. (The page's clock not sped up: the reconnect's back-off, 0.375
    to 0.625 s, is raced by the script that takes the tab as hidden, in the same run.)"""
    page, _shopper = _live_page_of_a_shopper_with_100(stack, browser, READS_AND_SOCKETS_RECORDED)
    tickets = lambda: [read["at"] for read in browser.execute_script(  # noqa: E731
        "return window.hseshopReads;") if read["path"] == "/api/notifications/tickets"]
    assert len(tickets()) == 1
    # Its socket lost, and once the page has set its reconnect, the tab hidden and the network
    # back, in the same task.
    hidden_at = browser.execute_async_script("""
        const done = arguments[arguments.length - 1];
        window.hseshopDropSocket();
        const once = () => {
          if (document.getElementById("live-status").dataset.state !== "reconnecting") {
            setTimeout(once, 0);
            return;
          }
          %s
          window.dispatchEvent(new Event("online"));
          done(performance.now());
        };
        once();""" % TAB_HIDDEN)
    time.sleep(1.5)  # (past the reconnect's back-off: nothing is to show)
    assert len(tickets()) == 1, (hidden_at, tickets())
    # Its next socket open, then the network gone and back while the tab is hidden.
    browser.execute_script(TAB_SHOWN)
    page.wait_until(lambda: len(browser.execute_script("return window.hseshopSockets;")) == 2
                    and page.element("live-status").get_attribute("data-state") == "live",
                    what="the page's socket open again, the tab shown")
    hidden_again_at = browser.execute_script(
        TAB_HIDDEN + ' window.dispatchEvent(new Event("offline"));'
        ' window.dispatchEvent(new Event("online")); return performance.now();')
    time.sleep(1)
    assert len(tickets()) == 2, (hidden_again_at, tickets())
    sockets = browser.execute_script("return window.hseshopSockets;")
    assert len(sockets) == 2 and sockets[1]["closed"] is not None, sockets  # (the dead one, gone)
    # The tab says so, and the page's poll is set (it reads nothing while the tab is hidden: its
    # read is made as the tab is shown, where a poll set only then would read 7.5 s on at the
    # soonest, after the socket has worked, that is never).
    assert page.element("live-status").get_attribute("data-state") == "reconnecting"
    shown_again_at = browser.execute_script(
        "const at = performance.now();" + TAB_SHOWN + " return at;")
    page.wait_until(lambda: len(browser.execute_script("return window.hseshopSockets;")) == 3
                    and page.element("live-status").get_attribute("data-state") == "live",
                    what="the page's socket open again, the tab shown again")
    listed = page.wait_until(
        lambda: [read["at"] for read in browser.execute_script("return window.hseshopReads;")
                 if read["path"].startswith("/api/orders") and read["at"] > hidden_again_at],
        timeout=3, what="the poll's read as the tab is shown")
    assert listed[0] >= shown_again_at and listed[0] < shown_again_at + 1000, (shown_again_at,
                                                                                listed)


# How often a live page checks that its socket brings the notifications (app.js BALANCE_READ_MS,
# with its read of the balance), its jitter's latest, and how long after a check it waits for a
# notification it has not seen (SOCKET_DELIVERY_GRACE_MS), in seconds.
SOCKET_CHECK_LATEST = 1.25 * 60
SOCKET_DELIVERY_GRACE_SECONDS = 15
# How long a message held on a socket (SOCKET_MESSAGES_WITHHELD) is let through after the page's
# read of the newest id that names it was answered, in the page's milliseconds: well within the
# grace.
HELD_MESSAGE_RELEASE_MS = 2000
# Played by the browser itself, over READS_AND_SOCKETS_RECORDED: the page's newest socket, once
# told, keeps its messages from the page, its connection open (READS_AND_SOCKETS_RECORDED still
# records each as it comes, and window.hseshopWithheld when): window.hseshopMuteSocket() for good,
# as a socket whose connection died with no close brings nothing; window.hseshopHoldSocket() each
# until a read of the page's of the newest notification's id is answered with its id or a newer
# one, and then HELD_MESSAGE_RELEASE_MS on (from the answer, or from the message's coming if it
# came after it; when the first was let through: window.hseshopReleasedAt), as notifications on
# their way over a working socket as the page reads the id. The rest is real.
SOCKET_MESSAGES_WITHHELD = _fetch_played(before="""
    window.hseshopWithheld = [];
    window.hseshopReleasedAt = null;
    const made = [];
    const muted = new Set();
    const holding = new Set();
    let held = [];
    let newestAnswered = 0;
    window.hseshopMuteSocket = () => muted.add(made.at(-1));
    window.hseshopHoldSocket = () => holding.add(made.at(-1));
    const letThroughLater = (socket, data) => setTimeout(() => {
      if (window.hseshopReleasedAt === null) window.hseshopReleasedAt = performance.now();
      const message = new MessageEvent("message", {data});
      message.hseshopLetThrough = true;
      socket.dispatchEvent(message);
    }, %d);
    const WithheldWebSocket = window.WebSocket;
    window.WebSocket = class extends WithheldWebSocket {
      constructor(...args) {
        super(...args);
        made.push(this);
        // (Added before the page sets its onmessage: this listener comes first.)
        this.addEventListener("message", (event) => {
          if (event.hseshopLetThrough || !(muted.has(this) || holding.has(this))) return;
          event.stopImmediatePropagation();
          window.hseshopWithheld.push(performance.now());
          if (!holding.has(this)) return;
          const {id} = JSON.parse(event.data);
          if (id <= newestAnswered) letThroughLater(this, event.data);
          else held.push({socket: this, data: event.data, id});
        });
      }
    };""" % HELD_MESSAGE_RELEASE_MS, answer="""
    const answer = await realFetch(input, init);
    if (path === "/api/notifications/newest" && holding.size && answer.ok) {
      const {id} = await answer.clone().json();
      newestAnswered = Math.max(newestAnswered, id);
      held.filter((message) => message.id <= newestAnswered)
        .forEach(({socket, data}) => letThroughLater(socket, data));
      held = held.filter((message) => message.id > newestAnswered);
    }
    return answer;""")


def _newest_reads(page: ShopPage) -> list[float]:
    """When the page read the newest notification's id, each time."""
    return [read["at"] for read in page.driver.execute_script("return window.hseshopReads;")
            if read["path"] == "/api/notifications/newest"]


def test_a_live_socket_that_brings_nothing_is_replaced_and_the_paid_order_shown(stack, browser):
    """A socket whose connection died with no close and no `offline` event (a phone's Wi-Fi
    switched to mobile data, a laptop woken on another network) stays open for minutes to the
    browser: the page showed "live", made no poll, and an order paid meanwhile showed NEW for as
    long. Now, as it reads the balance about every minute, it reads the newest notification's id:
    newer than the last it has seen, and still so past a grace, it replaces the socket, and the
    new one brings what the dead one did not. (The socket is muted on the page: its messages come
    and are kept from the page, the connection open. The page's clock sped up: the check's minute
    in 6 s.)"""
    speed_up_the_pages_clock(browser, CLOCK_SPEEDUP)
    browser.execute_cdp_cmd("Page.addScriptToEvaluateOnNewDocument",
                            {"source": READS_AND_SOCKETS_RECORDED})
    page, _shopper = _live_page_of_a_shopper_with_100(stack, browser, SOCKET_MESSAGES_WITHHELD)
    _socket_working(page, CLOCK_SPEEDUP)
    browser.execute_script("window.hseshopMuteSocket();")
    paid = page.place_order("30", "a book")  # (shown NEW, as its answer says)
    withheld_at = page.wait_until(
        lambda: browser.execute_script("return window.hseshopWithheld[0];"),
        timeout=LIVE_DEADLINE, what="the paid order's notification, kept from the page")

    def replaced():
        sockets = browser.execute_script("return window.hseshopSockets;")
        return sockets if len(sockets) == 2 and sockets[1]["messages"] else None

    sockets = page.wait_until(
        replaced, timeout=(SOCKET_CHECK_LATEST + SOCKET_DELIVERY_GRACE_SECONDS) / CLOCK_SPEEDUP
        + PAGE_DEADLINE, what="the muted socket replaced, and the new one's message")
    page.wait_for_status(paid, "FINISHED")
    page.wait_until(lambda: page.element("live-status").get_attribute("data-state") == "live",
                    what="the page live again")
    # Replaced by the check: the newest id read after the notification came, and the socket closed
    # a grace after that read (give or take its answer's time), by the page.
    checked = [at for at in _newest_reads(page) if withheld_at < at < sockets[0]["closed"]]
    assert checked, (withheld_at, sockets, _newest_reads(page))
    grace_ms = SOCKET_DELIVERY_GRACE_SECONDS * 1000
    assert checked[-1] + grace_ms - rounding_ms(CLOCK_SPEEDUP) < sockets[0]["closed"] < (
        checked[-1] + grace_ms + 1000 * CLOCK_SPEEDUP), (checked, sockets)
    assert sockets[1]["created"] > checked[-1] + grace_ms - rounding_ms(CLOCK_SPEEDUP), (
        checked, sockets)
    assert len(sockets[0]["messages"]) == 1 and len(sockets[1]["messages"]) == 1, sockets


def test_a_live_socket_that_brings_each_notification_is_kept_by_the_check(stack, browser):
    """The check of a live socket replaces one that has not brought a notification the newest id
    names a grace later, never one that does: here the notification is on its way (held on the
    page) as the page reads the newest id, and comes 2 s after the read's answer, within the
    grace; and the next check, the socket caught up, finds nothing to wait for. The socket is kept
    all along. (The page's clock sped up: the check's minute in 6 s; the hold's 2 s and the grace
    of 15 s are both the page's timers.)"""
    speed_up_the_pages_clock(browser, CLOCK_SPEEDUP)
    browser.execute_cdp_cmd("Page.addScriptToEvaluateOnNewDocument",
                            {"source": READS_AND_SOCKETS_RECORDED})
    page, shopper = _live_page_of_a_shopper_with_100(stack, browser, SOCKET_MESSAGES_WITHHELD)
    _socket_working(page, CLOCK_SPEEDUP)
    browser.execute_script("window.hseshopHoldSocket();")
    paid = shopper.place_order("30")["id"]
    page.wait_until(lambda: browser.execute_script("return window.hseshopWithheld.length;"),
                    timeout=LIVE_DEADLINE, what="the paid order's notification, held")
    released_at = page.wait_until(
        lambda: browser.execute_script("return window.hseshopReleasedAt;"),
        timeout=SOCKET_CHECK_LATEST / CLOCK_SPEEDUP + PAGE_DEADLINE,
        what="the page's check, and the notification let through after it")
    page.wait_for_status(paid, "FINISHED")
    grace_ms = SOCKET_DELIVERY_GRACE_SECONDS * 1000
    # The next check (45 s at the soonest after the one that let the notification through: past
    # its grace), and its own grace over.
    next_check = page.wait_until(
        lambda: [at for at in _newest_reads(page) if at > released_at][:1],
        timeout=SOCKET_CHECK_LATEST / CLOCK_SPEEDUP + PAGE_DEADLINE, what="the next check")[0]
    page.wait_until(lambda: browser.execute_script("return performance.now();")
                    > next_check + grace_ms + 1000 * CLOCK_SPEEDUP,
                    timeout=SOCKET_DELIVERY_GRACE_SECONDS / CLOCK_SPEEDUP + PAGE_DEADLINE,
                    what="the next check's grace over")
    sockets = browser.execute_script("return window.hseshopSockets;")
    assert len(sockets) == 1 and sockets[0]["closed"] is None, sockets
    assert page.element("live-status").get_attribute("data-state") == "live"


# Played by the browser itself: the page's first request for a socket ticket refused past the
# user's rate limit (429 RATE_LIMITED, Retry-After USERS_WAIT_SECONDS); the rest is real.
USERS_WAIT_SECONDS = 60
FIRST_TICKET_RATE_LIMITED = _fetch_played(before="window.hseshopTickets = [];", answer="""
    if (path === "/api/notifications/tickets") {
      window.hseshopTickets.push(performance.now());
      if (window.hseshopTickets.length === 1) {
        return refusal(429, "RATE_LIMITED", "Too many requests.", {"Retry-After": "%d"});
      }
    }
    return realFetch(input, init);""" % USERS_WAIT_SECONDS)
# Played by the browser itself: the page's first socket, as it opens, closed 1013 as the gateway
# closes one past the user's rate limit, naming USERS_WAIT_SECONDS (the page's close handler
# called with it, the real socket closed unheard); the rest is real.
FIRST_SOCKET_RATE_LIMITED = """
(() => {
  window.hseshopTickets = [];
  const SocketMade = window.WebSocket;
  let made = 0;
  window.WebSocket = class extends SocketMade {
    constructor(...args) {
      super(...args);
      window.hseshopTickets.push(performance.now());
      if (made++ > 0) return;
      this.addEventListener("open", () => {
        const handler = this.onclose;
        this.onclose = null;
        this.close();
        handler.call(this, new CloseEvent("close", {
          code: 1013, reason: "Too many requests: try again in %d s."}));
      });
    }
  };
})();
""" % USERS_WAIT_SECONDS


@pytest.mark.parametrize("played", [FIRST_TICKET_RATE_LIMITED, FIRST_SOCKET_RATE_LIMITED],
                         ids=["ticket-refused-429", "socket-closed-1013"])
def test_a_users_wait_for_a_socket_ends_with_their_session(stack, browser, played):
    """The wait for a socket kept across a sign-out is the address's alone (its handshakes): a
    ticket refused past the user's rate limit (429 RATE_LIMITED), or a socket closed 1013 naming
    the user's wait, was kept in it too, and the next user to sign in on the page waited up to as
    long for a socket. Now the user's wait ends with their session: the next user's socket opens
    at once."""
    page, _first = _shopper_with_100_on_the_page(stack, browser, played)
    page.wait_until(lambda: browser.execute_script("return window.hseshopTickets.length;")
                    and page.element("live-status").get_attribute("data-state") == "reconnecting",
                    what="the first user's socket refused")
    page.element("sign-out").click()
    page.wait_until(lambda: page.visible("auth-section"), what="the sign-in form")
    second = GatewayClient(stack.gateway_url)
    second.open_account_with("50")
    page.sign_in(second.username, "a long password")
    page.wait_until(lambda: page.text("balance") == "50.00", what="the second user's balance")
    page.wait_until(lambda: page.element("live-status").get_attribute("data-state") == "live",
                    what="the second user's socket open, the first's wait not theirs")
    assert browser.execute_script("return performance.now();") < (
        browser.execute_script("return window.hseshopTickets[0];") + USERS_WAIT_SECONDS * 1000)


# Played by the browser itself: Math.random at its highest (just under 1), so that each wait the
# page jitters is as long as its jitter makes it; the page's first read of the newest notification
# refused past the user's rate limit (Retry-After 3), its first request for a socket ticket as with
# Redis away (503, Retry-After 5); the rest is real. When each was asked is kept.
RANDOM_HIGHEST_AND_FIRST_READ_AND_TICKET_REFUSED = _fetch_played(before="""
    Math.random = () => 0.999;
    window.hseshopNewestReads = [];
    window.hseshopTickets = [];""", answer="""
    const refused = {
      "/api/notifications/newest": [window.hseshopNewestReads, 429, "RATE_LIMITED", "3"],
      "/api/notifications/tickets": [window.hseshopTickets, 503, "NOTIFICATIONS_UNAVAILABLE", "5"],
    }[path];
    if (refused) {
      const [asked, status, code, retryAfter] = refused;
      asked.push(performance.now());
      if (asked.length === 1) return refusal(status, code, "Not now.", {"Retry-After": retryAfter});
    }
    return realFetch(input, init);""")


def test_a_page_told_to_wait_comes_back_up_to_a_quarter_later_at_random(stack, browser):
    """A wait an answer asks for (Retry-After) is a floor the page's jitter goes on above, up to a
    quarter of it: its shop's load read again 3 s to 3.75 s after a 429 with Retry-After 3, its
    ticket asked for again 5 to 6.25 s after a 503 NOTIFICATIONS_UNAVAILABLE with Retry-After 5
    (here each at its latest, Math.random played at its highest). The floor wiped the jitter out
    before, and the pages whose sockets a process closed together (losing Redis, up to 192) came
    back in step, every 5 s. (The page's clock sped up as far as a quarter of each wait stays well
    over a busy machine's lateness in firing a timer.)"""
    speed_up_the_pages_clock(browser, RACING_CLOCK_SPEEDUP)
    browser.execute_cdp_cmd("Page.addScriptToEvaluateOnNewDocument",
                            {"source": RANDOM_HIGHEST_AND_FIRST_READ_AND_TICKET_REFUSED})
    page = ShopPage(browser, f"{stack.gateway_url}/").open()
    page.sign_up(f"web_{uuid.uuid4().hex[:12]}", PASSWORD)
    page.wait_until(lambda: page.element("live-status").get_attribute("data-state") == "live",
                    timeout=PAGE_DEADLINE + 5, what="the page's socket open")
    reads, tickets = browser.execute_script(
        "return [window.hseshopNewestReads, window.hseshopTickets];")
    early = rounding_ms(RACING_CLOCK_SPEEDUP)
    latest = 1 + 0.999 / 4
    assert reads[1] - reads[0] >= 3000 * latest - early, reads
    assert tickets[1] - tickets[0] >= 5000 * latest - early, tickets


# Played by the browser itself: the page's first two requests for a socket ticket are held, never
# answered (failed only when the page aborts them), its third answered 201 with no ticket; the rest
# are real. When each was asked, and when each held one was aborted, are kept.
TICKETS_HELD_FIRST = _fetch_played(before="""
    window.hseshopTickets = [];
    window.hseshopTicketsAborted = [];""", answer="""
    if (path === "/api/notifications/tickets") {
      const asked = window.hseshopTickets.length;
      window.hseshopTickets.push(performance.now());
      if (asked < 2) {
        return new Promise((_, reject) => {
          const signal = init && init.signal;
          if (signal) signal.addEventListener("abort", () => {
            window.hseshopTicketsAborted.push(performance.now());
            reject(new DOMException("The request was aborted.", "AbortError"));
          });
        });
      }
      if (asked === 2) {
        return new Response("{}", {status: 201, headers: {"Content-Type": "application/json"}});
      }
    }
    return realFetch(input, init);""")
TICKET_WAIT_SECONDS = 10  # app.js TICKET_WAIT_MS


def test_a_page_whose_ticket_request_hangs_gives_it_up_and_opens_its_socket_later(
        stack, browser):
    """A request for a socket ticket held unanswered (a proxy, a network gone quiet) stopped live
    updates for good: the page asked for no other ticket while one was awaited, and the `online`
    event, its way to open a dead socket again, did nothing without a socket. Now the network
    back online asks for a new ticket at once, a ticket unanswered after TICKET_WAIT_SECONDS is
    given up on and asked for again, and a 201 with no ticket in it is taken as no ticket: each
    asked for again later, the socket opened in the end. (The network back races the first
    ticket's wait, on the page's clock.)"""
    speed_up_the_pages_clock(browser, RACING_CLOCK_SPEEDUP)
    browser.execute_cdp_cmd("Page.addScriptToEvaluateOnNewDocument",
                            {"source": TICKETS_HELD_FIRST})
    shopper = GatewayClient(stack.gateway_url)
    shopper.open_account_with("100")
    page = ShopPage(browser, f"{stack.gateway_url}/").open()
    page.sign_in(shopper.username, "a long password")
    page.wait_until(lambda: browser.execute_script("return window.hseshopTickets.length;"),
                    what="the first ticket asked for")
    browser.execute_script('window.dispatchEvent(new Event("online"));')
    page.wait_until(lambda: browser.execute_script("return window.hseshopTickets.length;") >= 2,
                    what="a new ticket asked for once the network is back")
    page.wait_until(lambda: page.element("live-status").get_attribute("data-state") == "live",
                    timeout=TICKET_WAIT_SECONDS + 20, what="the page's socket open")
    tickets, aborted = browser.execute_script(
        "return [window.hseshopTickets, window.hseshopTicketsAborted];")
    assert len(tickets) == 4 and len(aborted) == 2, (tickets, aborted)
    assert aborted[0] < tickets[1] < tickets[0] + TICKET_WAIT_SECONDS * 1000, (tickets, aborted)
    given_up_at = tickets[1] + TICKET_WAIT_SECONDS * 1000 - rounding_ms(RACING_CLOCK_SPEEDUP)
    assert aborted[1] > given_up_at, (tickets, aborted)
    assert given_up_at < tickets[2] < tickets[3], tickets
    assert page.text("balance") == "100.00"


READ_WAIT_SECONDS = 30  # app.js READ_WAIT_MS


def test_a_page_whose_first_read_of_the_balance_hangs_gives_it_up_and_goes_live(stack, browser):
    """A read held unanswered (a proxy, a network gone quiet) held the shop's load for good: the
    page asked for its socket only once its first reads were answered, polled only once it had,
    and each later read of the balance joined the one held (the balance "…", the page offline,
    until the browser gave up). The shop's first read of the balance, held for real on its way to
    the gateway (by a proxy in front of it), is given up on after READ_WAIT_SECONDS: the load
    tries again, and the balance shows and the socket opens."""
    speed_up_the_pages_clock(browser, CLOCK_SPEEDUP)
    shopper = GatewayClient(stack.gateway_url)
    shopper.open_account_with("100")
    proxy = HoldingProxy(urlsplit(stack.gateway_url).netloc,
                         marker=b"GET /api/accounts/balance", first_only=True)
    try:
        page = ShopPage(browser, f"http://{proxy.address}/").open()
        page.sign_in(shopper.username, "a long password")
        wait_for(proxy.held.is_set, timeout=PAGE_DEADLINE, what="the first read of the balance")
        page.wait_until(
            lambda: page.text("balance") == "100.00"
            and page.element("live-status").get_attribute("data-state") == "live",
            timeout=READ_WAIT_SECONDS / CLOCK_SPEEDUP + PAGE_DEADLINE,
            what="the balance shown and the page's socket open")
    finally:
        proxy.close()


WRITE_WAIT_SECONDS = 30  # app.js WRITE_WAIT_MS


def _page_through_a_proxy_holding(stack, browser, marker: bytes):
    """A shopper with an account of 100 on the page, which reaches the gateway through a proxy
    that holds the first request starting with `marker` unanswered, for good (HoldingProxy,
    never released: a proxy or a network gone quiet); the page, the shopper and the proxy."""
    shopper = GatewayClient(stack.gateway_url)
    shopper.open_account_with("100")
    proxy = HoldingProxy(urlsplit(stack.gateway_url).netloc, marker=marker, first_only=True)
    page = ShopPage(browser, f"http://{proxy.address}/").open()
    page.sign_in(shopper.username, "a long password")
    page.wait_until(lambda: page.text("balance") == "100.00", what="the balance")
    return page, shopper, proxy


def test_an_order_held_unanswered_is_given_up_on_and_pressing_again_places_it_once(stack,
                                                                                   browser):
    """A write held unanswered (by a proxy, for good) kept its button disabled for ever: a write
    was never given up on, and the order could not be pressed again until a reload. Now it is
    given up on after WRITE_WAIT_SECONDS (on the page's clock, sped up), as one with no answer:
    the page says the order may have been placed and that pressing again retries it, and
    pressing again places it, once."""
    speed_up_the_pages_clock(browser, CLOCK_SPEEDUP)
    page, shopper, proxy = _page_through_a_proxy_holding(stack, browser, b"POST /api/orders")
    try:
        _order(page, "10", "a book")()
        wait_for(proxy.held.is_set, timeout=PAGE_DEADLINE, what="the order held")
        page.wait_until(lambda: "The order for 10.00 may have been placed" in page.text("message")
                        and page.element("order-submit").is_enabled(),
                        timeout=WRITE_WAIT_SECONDS / CLOCK_SPEEDUP + PAGE_DEADLINE,
                        what="the held order given up on, its button enabled")
        assert "Cannot reach the shop" in page.text("message")
        page.element("order-submit").click()  # the form as it was: a retry
        page.wait_until(lambda: page.text("message").startswith("Order for 10.00 placed"),
                        what="the order placed")
        (placed,) = shopper.api("GET", "/orders", 200)["items"]
        assert placed["description"] == "a book"
        page.wait_for_status(placed["id"], "FINISHED")
    finally:
        proxy.close()


def test_signing_out_gives_up_on_a_top_up_held_unanswered_and_keeps_its_key(stack, browser):
    """A top-up held unanswered (by a proxy, for good), then Sign out and in again as the same
    user: its button stayed disabled in the new session (pressing did nothing), as the sign-out
    left the request waiting. Now the sign-out gives up on every request of the session, at once
    (the page's clock not sped up: WRITE_WAIT_SECONDS do not pass), and keeps the top-up's key
    for the user: pressing again with the same amount retries it, counted once."""
    page, shopper, proxy = _page_through_a_proxy_holding(stack, browser,
                                                         b"POST /api/accounts/deposit")
    try:
        page.top_up("5")
        wait_for(proxy.held.is_set, timeout=PAGE_DEADLINE, what="the top-up held")
        assert not page.element("topup-submit").is_enabled()
        page.element("sign-out").click()
        page.wait_until(lambda: page.visible("auth-section"), what="the sign-in form")
        assert browser.execute_script(PENDING_KEYS_STORED) == [
            f"hseshop.pending-keys.{shopper.username}"]
        page.sign_in(shopper.username, "a long password")
        page.wait_until(lambda: page.visible("topup-form")
                        and page.element("topup-submit").is_enabled(),
                        what="the top-up button enabled in the new session")
        page.top_up("5")
        page.wait_until(lambda: page.text("message") in (
            "Topped up 5.00.", "The top-up of 5.00 had gone through already; it was not counted"
            " again."), what="the top-up retried")
        assert shopper.api("GET", "/accounts/balance", 200)["balance"] == "105.00"
    finally:
        proxy.close()


# Played by the browser itself: each time the page's tab is hidden or shown, and when.
VISIBILITY_RECORDED = """
window.hseshopVisibility = [];
document.addEventListener("visibilitychange", () => {
  window.hseshopVisibility.push({hidden: document.hidden, at: performance.now()});
});
"""


@contextmanager
def _page_whose_socket_is_held_connecting(stack, browser, played: str):
    """A shopper with an account of 100 on the page, reached through a proxy that holds every
    socket's handshake on its way to the gateway (the socket connecting for as long, or until the
    proxy is released), `played` and READS_AND_SOCKETS_RECORDED run before the page's scripts:
    (the page, the shopper, the proxy), the balance shown and the handshake held."""
    proxy = HoldingProxy(urlsplit(stack.gateway_url).netloc,
                         marker=b"GET /api/notifications/ws", each_connection=True)
    try:
        page, shopper = _shopper_with_100_on_the_page(stack, browser, READS_AND_SOCKETS_RECORDED,
                                                      played, base_url=f"http://{proxy.address}")
        wait_for(proxy.held.is_set, timeout=PAGE_DEADLINE, what="the socket's handshake, held")
        yield page, shopper, proxy
    finally:
        proxy.close()


def test_a_page_whose_socket_is_stuck_connecting_reads_its_orders_but_not_while_hidden(
        stack, browser):
    """A socket stuck connecting (its handshake held on its way to the gateway) never closes, and
    the page's own reads began only once one closed: a paid order showed as NEW for as long.
    They begin as the socket is opened. And a hidden tab reads nothing: the poll's read that falls
    due while it is hidden is skipped, and the tab shown again reads at once. (The tab hidden
    races the poll's first read, on the page's clock.)"""
    speed_up_the_pages_clock(browser, RACING_CLOCK_SPEEDUP)
    with _page_whose_socket_is_held_connecting(stack, browser, VISIBILITY_RECORDED) as (
            page, shopper, _proxy):
        shop_tab = browser.current_window_handle
        browser.switch_to.new_window("tab")  # the shop's tab hidden behind it
        hidden_since = time.monotonic()
        order = shopper.place_order("30")["id"]
        shopper.wait_until_final(order)
        # (The poll's first read falls due within POLL_LATEST of the socket's opening, before, on
        # the page's clock; 1 s more for a hidden tab's timers, which Chromium lets fire once a
        # second at most.)
        wait_for(lambda: time.monotonic() > hidden_since + POLL_LATEST / RACING_CLOCK_SPEEDUP + 1,
                 timeout=POLL_LATEST + 5, what="the poll's first read to fall due")
        browser.switch_to.window(shop_tab)
        page.wait_until(lambda: order in page.order_ids()
                        and page.badge(order).get_attribute("data-status") == "FINISHED",
                        what="the paid order read as the tab was shown")
        sockets, visibility, reads = browser.execute_script(
            "return [window.hseshopSockets, window.hseshopVisibility, window.hseshopReads];")
    assert len(sockets) == 1 and sockets[0]["opened"] is None, sockets  # connecting throughout
    (hidden, shown) = visibility
    assert hidden["hidden"] and not shown["hidden"], visibility
    assert hidden["at"] < sockets[0]["created"] + POLL_SOONEST * 1000, (sockets, visibility)
    assert shown["at"] > sockets[0]["created"] + POLL_LATEST * 1000, (sockets, visibility)
    listed = [read["at"] for read in reads if read["path"] == "/api/orders"]
    assert not [at for at in listed if hidden["at"] < at < shown["at"]], (visibility, listed)
    assert [at for at in listed if shown["at"] < at < shown["at"] + 1000], (visibility, listed)


def test_a_read_of_the_pages_poll_refused_for_the_rate_limit_says_nothing(stack, browser):
    """The page's socket stuck connecting, it reads its orders itself: its poll's read answered
    429, Retry-After longer than the poll's own wait (POLL_LATEST), says nothing (the user asked
    for no read), and the poll reads again no sooner than it was told, an order paid meanwhile
    then shown paid."""
    retry_after = round(POLL_LATEST) + 3  # (a poll that did not wait for it would read sooner)
    speed_up_the_pages_clock(browser, CLOCK_SPEEDUP)
    with _page_whose_socket_is_held_connecting(stack, browser, NEXT_READ_RATE_LIMITED) as (
            page, shopper, _proxy):
        _refused_next_read(browser, retry_after)
        refused_at = _refused_at(page)  # (the poll's first, within POLL_LATEST)
        # The poll's (it reads the orders first): not the balance's read now and then
        # (BALANCE_READ_MS, a few seconds on the page's clock sped up), which a page with no
        # poll makes while its socket is connecting.
        assert browser.execute_script("return window.hseshopRefusedPath;") == "/api/orders"
        order = shopper.place_order("30")["id"]
        time.sleep(0.5)  # (nothing is to show for a while: nothing to poll for)
        assert not page.visible("message"), page.text("message")
        page.wait_until(lambda: order in page.order_ids()
                        and page.badge(order).get_attribute("data-status") == "FINISHED",
                        timeout=retry_after + POLL_LATEST + 5,
                        what="the paid order read by the page's poll")
        assert not page.visible("message"), page.text("message")
        reads = browser.execute_script("return window.hseshopReads;")
    ends = refused_at + retry_after * 1000
    early = rounding_ms(CLOCK_SPEEDUP)
    assert not [read for read in reads if refused_at < read["at"] < ends - early
                and read["path"] == "/api/orders"], (refused_at, reads)


# Played by the browser itself: the page's second read of its first page of orders (the first is
# the shop's load: the second, its socket held connecting, the poll's) is answered as a service
# unavailable a moment; the rest is real.
POLLS_FIRST_READ_FAILED = _fetch_played(before="window.hseshopOrderLists = 0;", answer="""
    if (path === "/api/orders" && method === "GET" && ++window.hseshopOrderLists === 2) {
      return refusal(503, "SERVICE_UNAVAILABLE", "Not now.");
    }
    return realFetch(input, init);""")


def test_what_a_failed_read_of_the_pages_poll_showed_goes_once_its_socket_works(stack, browser):
    """The page's socket stuck connecting, its poll's read fails (503) and says so; the socket
    then opens, and once it works the poll stops: what the failed read showed is made good by a
    catch-up (the orders and the balance read again), and goes, where it stayed on screen."""
    speed_up_the_pages_clock(browser, CLOCK_SPEEDUP)
    with _page_whose_socket_is_held_connecting(stack, browser, POLLS_FIRST_READ_FAILED) as (
            page, _shopper, proxy):
        failed = "Part of the shop is not answering right now. Please try again in a moment."
        page.wait_until(lambda: page.visible("message") and page.text("message") == failed,
                        timeout=POLL_LATEST + 5, what="the poll's failed read, said")
        proxy.release()
        page.wait_until(lambda: page.element("live-status").get_attribute("data-state") == "live",
                        what="the page's socket open")
        page.wait_until(lambda: not page.visible("message"),
                        timeout=SOCKET_WORKED_SECONDS + CATCH_UP_SECONDS + 5,
                        what="the failed read's message gone")


def _socket_working(page: ShopPage, speedup: float) -> None:
    """Waits until the page's socket has stayed open SOCKET_WORKED_SECONDS: its poll stopped (half
    a second later, on the page's clock run `speedup` times as fast)."""
    def working() -> bool:
        sockets, now = page.driver.execute_script(
            "return [window.hseshopSockets, performance.now()];")
        last = sockets[-1]
        return (last["opened"] is not None and last["closed"] is None
                and now - last["opened"] > SOCKET_WORKED_SECONDS * 1000 + 500 * speedup)
    page.wait_until(working, timeout=SOCKET_WORKED_SECONDS + 5, what="the page's socket working")


def test_a_live_page_reads_the_balance_again_when_shown_or_focused(stack, browser):
    """Deposits made elsewhere (another tab, another device) send no notification: while its
    socket works, the page reads the balance again as its window is focused and its tab shown
    (and every minute or so), where it showed the old one until an order's notification came.
    (Its read now and then, BALANCE_READ_MS, would show the balance too: each is asserted read
    as the event came, on the page's clock.)"""
    speed_up_the_pages_clock(browser, RACING_CLOCK_SPEEDUP)
    page, elsewhere = _live_page_of_a_shopper_with_100(stack, browser,
                                                       READS_AND_SOCKETS_RECORDED)
    _socket_working(page, RACING_CLOCK_SPEEDUP)
    dispatched = {}
    for amount, target, event, balance in (("5", "window", "focus", "105.00"),
                                           ("7", "document", "visibilitychange", "112.00")):
        elsewhere.api("POST", "/accounts/deposit", 200, json={"amount": amount})
        dispatched[event] = browser.execute_script(
            f'const at = performance.now(); {target}.dispatchEvent(new Event("{event}"));'
            " return at;")
        page.wait_until(lambda balance=balance: page.text("balance") == balance,
                        what=f"the balance, on {event}")
    reads = [read["at"] for read in browser.execute_script("return window.hseshopReads;")
             if read["path"] == "/api/accounts/balance"]
    # (A read sent as the event is dispatched: well within a second, on the page's clock.)
    assert all([at for at in reads if since <= at < since + 1000]
               for since in dispatched.values()), (dispatched, reads)


# Played by the browser itself, over READS_AND_SOCKETS_RECORDED: the page's first top-up is
# answered as the gateway answers a user past the rate limit, Retry-After TOP_UP_RETRY_AFTER_SECONDS
# (3 s real at RACING_CLOCK_SPEEDUP, for the test's focus to fall within), and when it was is kept
# (window.hseshopRefusedAt); the rest is real.
TOP_UP_RETRY_AFTER_SECONDS = 9
TOP_UP_RATE_LIMITED = _fetch_played(before="window.hseshopRefusedAt = null;", answer="""
    if (path === "/api/accounts/deposit" && window.hseshopRefusedAt === null) {
      window.hseshopRefusedAt = performance.now();
      return refusal(429, "RATE_LIMITED", "Too many requests.", {"Retry-After": "%d"});
    }
    return realFetch(input, init);""" % TOP_UP_RETRY_AFTER_SECONDS)


def test_a_live_page_focused_while_told_to_wait_reads_nothing_then_or_later(stack, browser):
    """A top-up refused for the rate limit (Retry-After 9) pauses the page's reads, and no
    catch-up is due (no read was refused): the window focused during the pause reads nothing, not
    even after it, where its balance's read, refused on the page, set a catch-up of the orders and
    the balance for after it. Focused after the pause, it reads the balance. (The focus races the
    pause, on the page's clock.)"""
    speed_up_the_pages_clock(browser, RACING_CLOCK_SPEEDUP)
    browser.execute_cdp_cmd("Page.addScriptToEvaluateOnNewDocument",
                            {"source": READS_AND_SOCKETS_RECORDED})
    page, _shopper = _live_page_of_a_shopper_with_100(stack, browser, TOP_UP_RATE_LIMITED)
    _socket_working(page, RACING_CLOCK_SPEEDUP)
    page.top_up("5")
    refused_at = page.wait_until(
        lambda: browser.execute_script("return window.hseshopRefusedAt;"),
        what="the top-up, refused")
    # Said once the page has taken in the refusal, and its pause with it: the refusal played is
    # recorded as it is asked, and a focus before its answer is read was a focus before the pause.
    page.wait_until(lambda: f"Try again in {TOP_UP_RETRY_AFTER_SECONDS} s" in page.text("message"),
                    what="the page to say how long to wait")
    focused_at = browser.execute_script(
        'const at = performance.now(); window.dispatchEvent(new Event("focus")); return at;')
    ends = refused_at + TOP_UP_RETRY_AFTER_SECONDS * 1000
    assert focused_at < ends - 1000, ("focused too late", refused_at, focused_at)
    # Past when a catch-up set by the focus would have read (RECONNECT_MAX_MS / 2 from it, the
    # pause's end at the soonest).
    quiet_until = max(ends, focused_at + CATCH_UP_SECONDS * 1000) + 1000
    page.wait_until(lambda: browser.execute_script("return performance.now();") > quiet_until,
                    timeout=15, what="the page's clock past the pause and a catch-up's time")
    reads = browser.execute_script("return window.hseshopReads;")
    assert not [read for read in reads if read["at"] > refused_at
                and read["path"] != "/api/accounts/deposit"], (refused_at, reads)
    browser.execute_script('window.dispatchEvent(new Event("focus"));')
    page.wait_until(lambda: [read["path"] for read in browser.execute_script(
        "return window.hseshopReads;") if read["at"] > quiet_until] == ["/api/accounts/balance"],
        what="the balance read, focused after the pause")


def test_swagger_ui_runs_under_the_pages_policy_and_tries_an_order_out_with_a_string_amount(
        stack, browser):
    """The docs (the gateway's at /docs, a service's at /docs/swagger-ui) answered with the
    shop page's headers (tests/integration/test_openapi_documents.py), its files gzipped:
    Swagger UI shows every operation of the document; a service's offers no "Try it out" (its
    operations take only the gateway's signature), the gateway's fills in an order's amount as
    the string README promises ("30.00"; it filled in 30), and Execute reaches the gateway (401
    without a token); the policy stopped nothing Swagger UI does."""
    wait = WebDriverWait(browser, PAGE_DEADLINE, poll_frequency=0.1)
    for base, docs in ((stack.orders_url, "/docs/swagger-ui"), (stack.gateway_url, "/docs")):
        document = requests.get(f"{base}/docs/openapi.json", timeout=10).json()
        operations = sum(method != "parameters" for item in document["paths"].values()
                         for method in item)
        browser.get(f"{base}{docs}")
        wait.until(lambda driver: len(driver.find_elements(By.CSS_SELECTOR, ".opblock"))
                   == operations)
        bundle = browser.execute_script(
            "return performance.getEntriesByType('resource').find("
            "  entry => entry.name.endsWith('/swagger-ui-bundle.js'));")
        assert bundle["encodedBodySize"] < bundle["decodedBodySize"] / 2, bundle  # (gzipped)
        if base == stack.orders_url:
            operation = browser.find_element(By.ID, "operations-orders-place_order")
            operation.find_element(By.CSS_SELECTOR, ".opblock-summary").click()
            wait.until(lambda _: operation.find_elements(By.CSS_SELECTOR, ".opblock-body"))
            assert operation.find_elements(By.CSS_SELECTOR, ".try-out__btn") == []
    # (the gateway's, the last opened)
    operation = browser.find_element(By.ID, "operations-shop-place_order")
    operation.find_element(By.CSS_SELECTOR, ".opblock-summary").click()
    wait.until(lambda _: operation.find_element(By.CSS_SELECTOR, ".try-out__btn")).click()
    body = wait.until(lambda _: operation.find_element(By.CSS_SELECTOR,
                                                       "textarea.body-param__text"))
    assert json.loads(body.get_attribute("value")) == {"amount": "30.00", "description": ""}
    operation.find_element(By.CSS_SELECTOR, ".execute").click()
    status = wait.until(lambda _: operation.find_element(
        By.CSS_SELECTOR, ".live-responses-table tbody .response-col_status"))
    assert status.text.startswith("401"), status.text
    console = [entry["message"] for entry in browser.get_log("browser")]
    refused = [message for message in console if "Content Security Policy" in message]
    assert not refused, refused


SAVED_SESSION_EXPIRED = """
const saved = JSON.parse(sessionStorage.getItem("hseshop.session"));
saved.expiresAt = Date.now() - 1000;
sessionStorage.setItem("hseshop.session", JSON.stringify(saved));
"""


def _session_expired_and_page_reloaded(page: ShopPage) -> None:
    """The page's session over (its saved expiry passed), and the page reloaded: it shows the
    sign-in form."""
    page.driver.execute_script(SAVED_SESSION_EXPIRED)
    page.driver.refresh()
    page.wait_until(lambda: page.visible("auth-section"),
                    what="the sign-in form after the session expired")


# Played by the browser itself: each timer the page sets for 10 minutes or longer (its session's
# expiry's alone: its other waits are a minute and a quarter at most), its handler and delay kept,
# for the test to run the handler as the timer firing would, an hour or weeks on; and the page's
# wall clock (Date.now), which the test can move on.
LONG_TIMERS_RECORDED = """
window.hseshopLongTimers = [];
window.hseshopClockMovedMs = 0;
(() => {
  const realSetTimeout = window.setTimeout.bind(window);
  window.setTimeout = (handler, delay, ...args) => {
    if (delay >= 10 * 60 * 1000) window.hseshopLongTimers.push({handler, delay});
    return realSetTimeout(handler, delay, ...args);
  };
  const realNow = Date.now.bind(Date);
  Date.now = () => realNow() + window.hseshopClockMovedMs;
})();
"""
LONGEST_TIMER_MS = 2**31 - 1  # some 24.8 days: setTimeout fires at once when asked for longer
THIRTY_DAYS_MS = 30 * 24 * 3600 * 1000


def _long_timer_fired(browser, moved_ms: int) -> None:
    """The wall clock moved on by `moved_ms` since the page loaded, and the newest long timer's
    handler run, as the browser runs it then."""
    browser.execute_script(
        "window.hseshopClockMovedMs = arguments[0]; window.hseshopLongTimers.at(-1).handler();",
        moved_ms)


def test_a_session_longer_than_a_timer_can_wait_is_signed_out_when_it_expires_not_sooner(
        stack, browser):
    """A token of 30 days (AUTH_TOKEN_TTL_SECONDS allows it): the page's timer for its expiry waits
    some 24.8 days at most, and the page signed out when it fired, its token good for 5 days more.
    It waits again for the rest, and signs out once the token has expired. (The page's saved
    session says 30 days, as the gateway's answer said with that setting; its timers are run by
    the test, the wall clock moved on.)"""
    browser.execute_cdp_cmd("Page.addScriptToEvaluateOnNewDocument",
                            {"source": LONG_TIMERS_RECORDED})
    shopper = GatewayClient(stack.gateway_url)
    page = ShopPage(browser, f"{stack.gateway_url}/").open()
    page.sign_in(shopper.username, "a long password")
    browser.execute_script("""
        const saved = JSON.parse(sessionStorage.getItem("hseshop.session"));
        saved.expiresAt = Date.now() + arguments[0];
        sessionStorage.setItem("hseshop.session", JSON.stringify(saved));""", THIRTY_DAYS_MS)
    browser.refresh()
    page.wait_until(lambda: browser.execute_script("return window.hseshopLongTimers.length;"),
                    what="the session's expiry watched")
    assert page.visible("shop-section")
    first = browser.execute_script("return window.hseshopLongTimers[0].delay;")
    assert first == LONGEST_TIMER_MS, first

    _long_timer_fired(browser, LONGEST_TIMER_MS)
    assert page.visible("shop-section") and not page.visible("auth-section")
    delays = browser.execute_script("return window.hseshopLongTimers.map((timer) => timer.delay);")
    assert len(delays) == 2, delays
    rest = THIRTY_DAYS_MS - LONGEST_TIMER_MS
    assert rest - 60_000 < delays[1] <= rest, delays  # (the page loaded within the minute)

    _long_timer_fired(browser, THIRTY_DAYS_MS + 1000)
    page.wait_until(lambda: page.visible("auth-section"), what="the sign-in form, expired")
    assert "Your session has expired" in page.text("message")


# The page's wall clock moved on past its session's expiry, and the expiry's timer fired.
SESSION_EXPIRES = """
const left = JSON.parse(sessionStorage.getItem("hseshop.session")).expiresAt - Date.now();
window.hseshopClockMovedMs += left + 1000;
window.hseshopLongTimers.at(-1).handler();
"""
SHOP_FORMS = ("order-amount", "order-description", "topup-amount")


def _shop_forms(page: ShopPage) -> list[str]:
    return [page.element(field).get_attribute("value") for field in SHOP_FORMS]


def _session_expired(page: ShopPage) -> None:
    page.driver.execute_script(SESSION_EXPIRES)
    page.wait_until(lambda: page.visible("auth-section")
                    and "Your session has expired" in page.text("message"),
                    what="the page signed out, its session expired")


def test_a_session_expiring_as_its_user_types_keeps_what_they_typed_for_them_alone(stack,
                                                                                   browser):
    """The session's expiry (its timer firing, the hour up) cleared the shop's forms as a
    sign-out button does: a user typing an order at the hour lost it. It is kept now for the same
    user signed in again, and cleared for another user signing in (and by the sign-out buttons:
    test_a_wrong_password_is_explained_and_signing_out_and_in_again_keeps_the_orders)."""
    page, shopper = _shopper_with_100_on_the_page(stack, browser, LONG_TIMERS_RECORDED)
    typed = ["30", "a book being typed", "25"]
    for field, value in zip(SHOP_FORMS, typed):
        page.fill(field, value)
    _session_expired(page)
    assert _shop_forms(page) == typed
    page.sign_in(shopper.username, "a long password")
    page.wait_until(lambda: page.text("balance") == "100.00", what="the balance")
    assert _shop_forms(page) == typed

    _session_expired(page)
    other = GatewayClient(stack.gateway_url)
    page.sign_in(other.username, "a long password")
    page.wait_until(lambda: page.text("current-user") == other.username, what="the other user")
    assert _shop_forms(page) == ["", "", ""]


def test_a_lost_top_up_or_order_retried_once_its_user_signed_in_again_is_carried_out_once(
        stack, browser):
    """The keys of attempts whose answers were lost outlive the session (the services keep a key
    for the user, whatever the token): the same user signed in again in the tab, after the
    session expired or after a request was refused for its token (401), retries under them."""
    page, shopper = _live_page_of_a_shopper_with_100(stack, browser, ANSWERS_LOST_WHEN_TOLD)
    _answer_lost(page, lambda: page.top_up("20"), "The top-up of 20.00 may have gone through")

    _session_expired_and_page_reloaded(page)
    _signed_in_again_and_lost_top_up_retried(page, shopper, "20")
    assert shopper.api("GET", "/accounts/balance", 200)["balance"] == "120.00"

    _answer_lost(page, _order(page, "5", "pen"), "The order for 5.00 may have been placed")
    token = browser.execute_script(
        "return JSON.parse(sessionStorage.getItem('hseshop.session')).token")
    # Signed out elsewhere: the gateway closes the page's socket, and refuses its next request.
    signed_out = requests.post(f"{stack.gateway_url}/api/auth/logout", timeout=10,
                               headers={"Authorization": f"Bearer {token}"})
    assert signed_out.status_code == 204, signed_out.text
    page.wait_until(lambda: page.visible("auth-section")
                    and "Please sign in again" in page.text("message"), timeout=LIVE_DEADLINE,
                    what="the page signed out by the refused token")
    page.sign_in(shopper.username, "a long password")
    _order(page, "5", "pen")()
    page.wait_until(lambda: "That order for 5.00 was placed already" in page.text("message"),
                    what="the order retried")
    assert [order["description"] for order in shopper.api("GET", "/orders", 200)["items"]] == [
        "pen"]


def test_a_users_kept_keys_are_forgotten_when_another_user_signs_in_in_the_tab(stack, browser):
    """What the forms of a user whose session expired held is kept for their next sign-in, and
    forgotten when another user signs in in the tab: the same contents are a new attempt for the
    other, and for the first signed in again after them."""
    page, first = _live_page_of_a_shopper_with_100(stack, browser, ANSWERS_LOST_WHEN_TOLD)
    _answer_lost(page, lambda: page.top_up("20"), "The top-up of 20.00 may have gone through")
    _session_expired_and_page_reloaded(page)
    assert browser.execute_script(PENDING_KEYS_STORED) == [
        f"hseshop.pending-keys.{first.username}"]

    second = GatewayClient(stack.gateway_url)
    second.open_account_with("100")
    page.sign_in(second.username, "a long password")
    assert browser.execute_script(PENDING_KEYS_STORED) == []
    page.wait_until(lambda: page.visible("topup-form"), what="the top-up form")
    page.top_up("20")
    page.wait_until(lambda: page.text("message") == "Topped up 20.00.", what="the second's top-up")
    assert second.api("GET", "/accounts/balance", 200)["balance"] == "120.00"

    _session_expired_and_page_reloaded(page)
    page.sign_in(first.username, "a long password")
    page.wait_until(lambda: page.visible("topup-form"), what="the top-up form")
    page.top_up("20")
    page.wait_until(lambda: page.text("message") == "Topped up 20.00.", what="a new top-up")
    assert first.api("GET", "/accounts/balance", 200)["balance"] == "140.00"


# Fills the tab's sessionStorage to the last character it takes (a filler item as long as it can
# be); whether one more is refused.
FILL_SESSION_STORAGE = """
let low = 0;
let high = 16 * 1024 * 1024;
while (low < high) {
  const length = Math.ceil((low + high) / 2);
  try {
    sessionStorage.setItem("filler", "x".repeat(length));
    low = length;
  } catch (exc) {
    high = length - 1;
  }
}
try {
  sessionStorage.setItem("filler", "x".repeat(low + 1));
  return false;
} catch (exc) {
  return true;
}
"""


def test_keys_the_full_storage_could_not_save_leave_no_settled_key_behind(stack, browser):
    """The tab's storage full: a lost top-up's key cannot be saved, and what was saved before (the
    key of a lost top-up of 20) goes with it, rather than stay as it was: once that top-up is
    retried and settled, a new top-up of 20 after a reload is a new one, not taken for a replay
    under the settled key."""
    page, shopper = _live_page_of_a_shopper_with_100(stack, browser, ANSWERS_LOST_WHEN_TOLD)
    _answer_lost(page, lambda: page.top_up("20"), "The top-up of 20.00 may have gone through")
    assert browser.execute_script(FILL_SESSION_STORAGE), "the storage is not full"
    _answer_lost(page, lambda: page.top_up("1000"), "The top-up of 1000.00 may have gone through")
    page.top_up_retried("20")

    browser.execute_script("sessionStorage.removeItem('filler');")
    browser.refresh()
    page.wait_until(lambda: page.visible("shop-section") and page.visible("topup-form"),
                    what="the shop after the reload")
    page.top_up("20")
    page.wait_until(lambda: page.text("message") == "Topped up 20.00.", what="a new top-up")
    assert shopper.api("GET", "/accounts/balance", 200)["balance"] == "1140.00"


# Played by the browser itself: the first top-up reaches the shop, which carries it out, and its
# answer is a service's 503 DATABASE_UNAVAILABLE (its commit went through as its connection was
# lost); the rest is real.
FIRST_TOP_UP_ANSWERED_DATABASE_UNAVAILABLE = _fetch_played(before="let answered = false;",
                                                          answer="""
    const response = await realFetch(input, init);
    if (path === "/api/accounts/deposit" && !answered) {
      answered = true;
      return refusal(503, "DATABASE_UNAVAILABLE",
                     "The service cannot reach its database just now; try again shortly.",
                     {"Retry-After": "1"});
    }
    return response;""")


def test_a_top_up_answered_database_unavailable_is_said_to_have_maybe_gone_through(stack,
                                                                                   browser):
    """A service's 503 DATABASE_UNAVAILABLE may follow a commit that went through: the page
    says the top-up may have gone through and reads the balance again; pressing again retries
    it, counted once."""
    page, shopper = _live_page_of_a_shopper_with_100(
        stack, browser, FIRST_TOP_UP_ANSWERED_DATABASE_UNAVAILABLE)
    _top_up_maybe_through_then_retried(page, "5", "105.00")
    assert shopper.api("GET", "/accounts/balance", 200)["balance"] == "105.00"
