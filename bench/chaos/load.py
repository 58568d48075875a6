"""The load: shoppers placing orders (keyed, unkeyed, a key sent again) and deposits, through the
gateway and straight to the services' APIs, as careful clients do under failures (a keyed request
asked again while its answer is transient), and a ledger of what the shop acknowledged, which the
invariants are checked against."""

from __future__ import annotations

import random
import threading
import time
import uuid
from collections import Counter, defaultdict
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field, replace
from decimal import Decimal

import requests

from bench.chaos.plan import ChaosPlan
from bench.chaos.sign_in import ShopperSession, error_code, refused_as_expired
from devstack.stack import Stack
from shared.caller_deadline import deadline_moment
from shared.config import load_settings
from shared.idempotency import REPLAYED, REPLAYED_HEADER
from shared.internal_auth import DEADLINE_HEADER, SignedAs

OPENING_DEPOSIT = Decimal("100.00")
# An order's amount is mostly small; one in ten is more than an opening deposit, to be CANCELLED
# for want of funds unless deposits came first.
LARGE_ORDER = "150.00"
# How long a careful client asks again with its key, and waits for one answer.
RETRY_SECONDS = 30
DEPOSIT_RETRY_SECONDS = 60
# How long sending the deposits left unconfirmed again after the run may take in all (a settled
# shop answers each at once), give or take one request's timeout.
RESOLVE_SECONDS = 60
REQUEST_TIMEOUT = 15
PASSWORD = "a long password"  # every shopper's
RETRY_PAUSE = 0.3
LOAD_THREADS = 24
# What the ledger's answers count a shopper's sign-in again under (their token expired), made or
# failed.
SIGN_IN_AGAIN = "sign-in again: "


@dataclass(frozen=True)
class Shopper:
    user_id: str
    token: str  # as registered
    # What they registered with: they sign in again with them once the token expires.
    username: str
    password: str
    # Their token as it is now (the registered one, then each sign-in's), one for every thread
    # acting for them: the load's and their notification follower's.
    session: ShopperSession = field(init=False, repr=False, compare=False)

    def __post_init__(self):
        object.__setattr__(self, "session",
                           ShopperSession(self.username, self.password, self.token))


AMBIGUOUS_STATUSES = (502, 504)
# The one 503 that may hide an order placed: its service's database failed, which may have been
# as it committed (the commit made, its answer lost: the soak crashes PostgreSQL).
COMMIT_MAY_HAVE_GONE_THROUGH = "DATABASE_UNAVAILABLE"
# How long after a crashed PostgreSQL answers again a try answered 503 DATABASE_UNAVAILABLE that
# was then in flight is still held to be one the crash may have failed as it committed: margin
# for the clocks read around a try and a restart, not for the shop's slowness (a try in flight
# as PostgreSQL was killed overlaps its crash whenever its answer comes).
AFTER_A_CRASH_SECONDS = 0.5

# When something went on: (from, until), time.monotonic()'s.
Span = tuple[float, float]

# When this thread last sent a request (Load._send's `sent`, time.monotonic()'s): where an order's
# try began, after any resend of Load._post's.
_this_threads_try = threading.local()


def transient(status: int | str) -> bool:
    """Whether the answer to a keyed request (an order's, a deposit's) is one a careful client
    asks again after: none (the name of the exception that stood for one), a 5xx, a 429 or a 408
    (the request's reading timed out). Any other (a 4xx such as a 422 or a 401) is the shop's
    word on the request, given again to each try."""
    return isinstance(status, str) or status in (408, 429) or status >= 500


@dataclass
class Request:
    """One logical order request (a keyed one with all its tries, or a single unkeyed try), known
    by the tag sent as its order's description: what it sent, every answer its tries got, and
    the orders the 202s named."""

    user: str
    amount: Decimal
    answers: list[int | str] = field(default_factory=list)
    acknowledged: set[str] = field(default_factory=set)
    # When each try answered 503 DATABASE_UNAVAILABLE (COMMIT_MAY_HAVE_GONE_THROUGH) was in
    # flight: from its sending to its answer.
    database_failed: list[Span] = field(default_factory=list)

    def ambiguous(self, database_crashes: Sequence[Span] = ()) -> bool:
        """Whether a try may have placed an order unacknowledged: one with no answer (its
        exception's name), a 502 or 504 (the gateway's call sent, its answer lost), or a 503
        DATABASE_UNAVAILABLE in flight during one of `database_crashes` (PostgreSQL's, from its
        kill until it answered again: Disruptor.outages) or AFTER_A_CRASH_SECONDS after (the
        crash may have failed the order's transaction as it committed, having committed it).
        Any other 503 says it was not (the gateway's call never sent, or the service's own
        refusal before its commit), and so does a DATABASE_UNAVAILABLE with no crash about: the
        invariants hold the shop to it."""
        lost = any(not isinstance(answer, int) or answer in AMBIGUOUS_STATUSES
                   for answer in self.answers)
        return lost or any(during_a_crash(tried, database_crashes)
                           for tried in self.database_failed)


def during_a_crash(tried: Span, crashes: Sequence[Span]) -> bool:
    """Whether a try (`tried`: its sending to its answer) was in flight during one of `crashes`
    or AFTER_A_CRASH_SECONDS after it."""
    sent, answered = tried
    return any(sent <= back + AFTER_A_CRASH_SECONDS and answered >= killed
               for killed, back in crashes)


@dataclass(frozen=True)
class UnconfirmedDeposit:
    """A keyed deposit that went unconfirmed until the load's patience ran out (`last_answer`
    its last try's): it may have been made. Sent again as it was (its key, amount and way in) once
    the shop has settled, to learn which (Load.resolve_unconfirmed_deposits)."""

    shopper: Shopper
    amount: Decimal
    key: str
    via: str
    last_answer: int | str


@dataclass
class Ledger:
    """What the shop acknowledged: orders accepted (202) with their user and amount, each order
    request by its tag (what it sent and got), deposits confirmed (200) per user, those not
    confirmed yet, and the answers counted by kind."""

    accepted: dict[str, tuple[str, Decimal]] = field(default_factory=dict)
    requests: dict[str, Request] = field(default_factory=dict)
    deposited: dict[str, Decimal] = field(default_factory=lambda: defaultdict(Decimal))
    unconfirmed_deposits: list[UnconfirmedDeposit] = field(default_factory=list)
    answers: Counter[str] = field(default_factory=Counter)
    lock: threading.Lock = field(default_factory=threading.Lock)

    def resolve(self, deposit: UnconfirmedDeposit, status: int | str, replayed: bool
                ) -> str | None:
        """Take in what `deposit`'s request sent again after the run was answered: a 200 replayed
        (Idempotent-Replayed: true, the first answer kept under its key) says an earlier try made
        it, a fresh 200 that it is made now; either way it counts as deposited, once, and the
        answer is said ("made before" or "made now"). A 404 (no account) says no try made it: it
        counts nothing ("never made"). Any other answer says nothing of the earlier tries (None):
        the deposit stays unconfirmed."""
        if status == 404:
            return "never made"
        if status != 200:
            return None
        self.deposited[deposit.shopper.user_id] += deposit.amount
        return "made before" if replayed else "made now"


class Load:
    """Offers orders and deposits at the plan's rate from a pool of threads, and opens the late
    shoppers' accounts, until stopped."""

    def __init__(self, plan: ChaosPlan, stack: Stack, say: Callable[[str], None]):
        self.plan, self.stack, self.say = plan, stack, say
        self.rng = random.Random(f"load-{plan.seed}")
        self.gateway = stack.gateway_url
        self.secret = load_settings(stack.env).internal_auth_secret
        self.ledger = Ledger()
        self.shoppers: list[Shopper] = []
        self._late: list[tuple[Shopper, str]] = []  # with the deposit key each opens with
        # Each sent again as it was: the same key, body (its tag among it) and way in.
        self._keys_to_repeat: list[tuple[Shopper, str, str, str, str]] = []
        self._stop = threading.Event()
        self._threads = [threading.Thread(target=self._offer, name="chaos-load"),
                         threading.Thread(target=self._open_late_accounts, name="chaos-late")]

    def seed_shoppers(self) -> None:
        """Registered through the gateway; all but the late ones with an account and an opening
        deposit."""
        with requests.Session() as http:
            for n in range(self.plan.users):
                username = f"chaos{self.plan.seed}-{uuid.uuid4().hex[:8]}"
                answer = http.post(f"{self.gateway}/api/auth/register", timeout=REQUEST_TIMEOUT,
                                   json={"username": username, "password": PASSWORD})
                answer.raise_for_status()
                body = answer.json()
                shopper = Shopper(body["user_id"], body["access_token"], username, PASSWORD)
                self.shoppers.append(shopper)
                self.ledger.deposited[shopper.user_id] = Decimal("0.00")
                if n >= self.plan.users - self.plan.late_users:
                    self._late.append((shopper, uuid.uuid4().hex))
                    continue
                bearer = {"Authorization": f"Bearer {shopper.token}"}
                http.post(f"{self.gateway}/api/accounts", headers=bearer,
                          timeout=REQUEST_TIMEOUT).raise_for_status()
                http.post(f"{self.gateway}/api/accounts/deposit", headers=bearer,
                          json={"amount": str(OPENING_DEPOSIT)},
                          timeout=REQUEST_TIMEOUT).raise_for_status()
                self.ledger.deposited[shopper.user_id] += OPENING_DEPOSIT

    def start(self) -> Load:
        for thread in self._threads:
            thread.start()
        return self

    def stop(self) -> int:
        """Stop offering, once every request offered is answered or given up; how many were."""
        self._stop.set()
        for thread in self._threads:
            thread.join()
        return self._offered

    # --- the requests ------------------------------------------------------------------------

    def _offer(self) -> None:
        self._offered = 0
        # Offers waiting for a thread, at most as many again as there are threads: a shop too
        # slow for the rate slows the offers (the rate is a ceiling), where an unbounded queue
        # would grow for the whole run and the stop wait for every offer in it.
        waiting = threading.BoundedSemaphore(LOAD_THREADS * 2)
        with ThreadPoolExecutor(LOAD_THREADS) as pool:
            start = time.monotonic()
            while not self._stop.is_set():
                if not waiting.acquire(timeout=0.5):
                    continue
                self._offered += 1
                offer = pool.submit(self._deposit if self.rng.random() < 0.05 else self._order)
                offer.add_done_callback(lambda _offer: waiting.release())
                time.sleep(max(0.0, start + self._offered / self.plan.rate - time.monotonic()))

    def _post(self, shopper: Shopper, via: str, path: str, body: dict | None, key: str | None,
              deadline: float) -> tuple[int | str, requests.Response | None]:
        """The answer's status and the answer, or the name of the exception that stood for one
        and None (_send's), through the gateway with the shopper's current token. A token the
        gateway refuses as expired, the shopper signs in again and the request is sent again as
        it was (its key and body): the gateway's bearer check refused it before it forwarded
        anything. Until the `deadline` (time.monotonic()'s: the request's patience) at most,
        then the refusal is the answer."""
        while True:
            token = shopper.session.token
            status, answer = self._send(shopper, via, path, body, key, token)
            if not (via == "gateway" and refused_as_expired(answer)):
                return status, answer
            # (Checked after a sign-in made too: a token that expires as soon as it is issued
            # must not keep the request going past its patience.)
            if (time.monotonic() >= deadline
                    or not self._signed_in_again(shopper, token, deadline)):
                return status, answer

    def _signed_in_again(self, shopper: Shopper, refused: str, deadline: float) -> bool:
        """Whether the shopper holds a token other than `refused` by the `deadline`: signed in
        again here, or by another of their threads. A sign-in failing (the gateway down, its
        database or Redis) is asked again after its pause, as long as the deadline allows; each
        one made or failed counted among the ledger's answers."""
        while True:
            sign_in = shopper.session.sign_in_again(self.gateway, refused)
            if sign_in.made or sign_in.failed is not None:
                with self.ledger.lock:
                    self.ledger.answers[SIGN_IN_AGAIN + ("made" if sign_in.made
                                                         else f"failed {sign_in.failed}")] += 1
            if sign_in.token is not None:
                return True
            if time.monotonic() + sign_in.wait > deadline:
                return False
            time.sleep(sign_in.wait)

    def _send(self, shopper: Shopper, via: str, path: str, body: dict | None, key: str | None,
              token: str) -> tuple[int | str, requests.Response | None]:
        """One try: the answer's status and the answer, or the name of the exception that stood
        for one and None. Through the gateway with `token`, or to the service's API signed as the
        gateway signs (with a deadline, as it sends one)."""
        headers = {"Idempotency-Key": key} if key else {}
        _this_threads_try.sent = time.monotonic()
        try:
            if via == "gateway":
                answer = requests.post(f"{self.gateway}/api{path}", json=body,
                                       timeout=REQUEST_TIMEOUT, headers={
                                           **headers, "Authorization": f"Bearer {token}"})
            else:
                base = self.stack.orders_url if path == "/orders" else self.stack.payments_url
                headers[DEADLINE_HEADER] = deadline_moment(REQUEST_TIMEOUT * 4)
                answer = requests.post(f"{base}{path}", json=body, headers=headers,
                                       timeout=REQUEST_TIMEOUT,
                                       auth=SignedAs(shopper.user_id, self.secret))
        except requests.RequestException as exc:
            return type(exc).__name__, None
        return answer.status_code, answer

    def _order(self) -> None:
        ledger = self.ledger
        with ledger.lock:
            repeat = self._keys_to_repeat and self.rng.random() < 0.1
            if repeat:
                shopper, amount, key, via, tag = self.rng.choice(self._keys_to_repeat)
            else:
                shopper = self.rng.choice(self.shoppers)
                amount = (str(Decimal(self.rng.randint(1, 800)) / 100)
                          if self.rng.random() < 0.9 else LARGE_ORDER)
                key = uuid.uuid4().hex if self.rng.random() < 0.6 else None
                via = "gateway" if self.rng.random() < 0.5 else "orders-api"
                tag = uuid.uuid4().hex
        kind = "repeat" if repeat else "keyed" if key else "unkeyed"
        deadline = time.monotonic() + RETRY_SECONDS
        while True:
            # An unkeyed request is tried once: a tag of its own. A keyed one keeps its tag over
            # its tries (and a repeat of its key), so that the orders it placed can be counted.
            _this_threads_try.sent = time.monotonic()
            status, answer = self._post(shopper, via, "/orders",
                                        {"amount": amount, "description": tag}, key, deadline)
            # (From the last try's sending: not a try refused 401 for an expired token and the
            # sign-in after it, during which a crash says nothing of this try.)
            tried = (_this_threads_try.sent, time.monotonic())
            with ledger.lock:
                ledger.answers[f"order {via} {kind} {status}"] += 1
                request = ledger.requests.setdefault(
                    tag, Request(shopper.user_id, Decimal(amount)))
                request.answers.append(status)
                if status == 503 and error_code(answer) == COMMIT_MAY_HAVE_GONE_THROUGH:
                    request.database_failed.append(tried)
                if status == 202:
                    order_id = answer.json()["id"]
                    ledger.accepted[order_id] = (shopper.user_id, Decimal(amount))
                    request.acknowledged.add(order_id)
                    if key and not repeat:
                        self._keys_to_repeat.append((shopper, amount, key, via, tag))
                    return
            if key and transient(status) and time.monotonic() < deadline:
                time.sleep(RETRY_PAUSE)
                continue  # a careful client asks again with its key
            if isinstance(status, int) and status not in (502, 503, 504):
                self.say(f"order refused {status}: {answer.text[:300]}")
            return

    def _deposit(self) -> None:
        with self.ledger.lock:
            shopper = self.rng.choice(self.shoppers)
            amount = Decimal(self.rng.randint(100, 3000)) / 100
            via = "gateway" if self.rng.random() < 0.5 else "payments-api"
        self._deposit_confirmed(shopper, amount, uuid.uuid4().hex, via)

    def _deposit_confirmed(self, shopper: Shopper, amount: Decimal, key: str, via: str) -> bool:
        """A keyed deposit asked until answered; False on a 404 (no account yet), or once out of
        patience (then noted as unconfirmed: it may have been made), or refused otherwise (noted
        too, to be sent again after the run: the load's deposits are never refused)."""
        status, _ = self._deposit_until_answered(shopper, amount, key, via,
                                                  time.monotonic() + DEPOSIT_RETRY_SECONDS)
        with self.ledger.lock:
            if status == 200:
                self.ledger.deposited[shopper.user_id] += amount
                return True
            if status == 404:
                return False
            self.ledger.unconfirmed_deposits.append(
                UnconfirmedDeposit(shopper, amount, key, via, status))
        self.say(f"deposit of {amount} for {shopper.user_id} unconfirmed: {status}")
        return False

    def _deposit_until_answered(self, shopper: Shopper, amount: Decimal, key: str, via: str,
                                deadline: float) -> tuple[int | str, requests.Response | None]:
        """A keyed deposit asked again while its answer is transient, until the `deadline`
        (time.monotonic()'s) at most; the last try's answer."""
        while True:
            status, answer = self._post(shopper, via, "/accounts/deposit",
                                        {"amount": str(amount)}, key, deadline)
            with self.ledger.lock:
                self.ledger.answers[f"deposit {via} {status}"] += 1
            if not transient(status) or time.monotonic() > deadline:
                return status, answer
            time.sleep(RETRY_PAUSE)

    def resolve_unconfirmed_deposits(self, shop_settled: bool) -> None:
        """Once the load has stopped and the shop settled: each deposit left unconfirmed sent
        again as it was, under its key, which the shop's idempotency answers with the first try's
        answer if a try made it, or makes it now, or answers 404 if there is no account to make
        it in, or was none when a try was refused so (that refusal kept under the key, replayed:
        shared.idempotency) (Ledger.resolve). Those the shop answers so are resolved (counted as
        deposited, or not, when never made); any other is left in `unconfirmed_deposits` (the
        invariants say each: a settled shop answers a deposit), as are those not sent again
        within RESOLVE_SECONDS, the whole step's patience. None is sent again to a shop that did not
        settle (the run's first problem): it would answer them no better than during the run."""
        deposits, unresolved = self.ledger.unconfirmed_deposits, []
        if not shop_settled:
            if deposits:
                self.say(f"{len(deposits)} unconfirmed deposits not sent again: the shop did not"
                         " settle")
            return
        deadline = time.monotonic() + RESOLVE_SECONDS
        for n, deposit in enumerate(deposits):
            if time.monotonic() > deadline:
                unresolved += deposits[n:]
                self.say(f"{len(deposits) - n} unconfirmed deposits not sent again: out of time"
                         f" ({RESOLVE_SECONDS}s for them all)")
                break
            status, answer = self._deposit_until_answered(deposit.shopper, deposit.amount,
                                                          deposit.key, deposit.via, deadline)
            replayed = answer is not None and answer.headers.get(REPLAYED_HEADER) == REPLAYED
            with self.ledger.lock:
                outcome = self.ledger.resolve(deposit, status, replayed)
                self.ledger.answers[f"deposit sent again: {outcome or 'unconfirmed'}"] += 1
            if outcome is None:
                unresolved.append(replace(deposit, last_answer=status))
            self.say(f"unconfirmed deposit of {deposit.amount} for {deposit.shopper.user_id}"
                     f" sent again: {outcome or f'still unconfirmed, {status}'}")
        self.ledger.unconfirmed_deposits = unresolved

    def _open_late_accounts(self) -> None:
        """Each late shopper's account opened (asked until 201, or 409 once made) and funded, a
        few seconds apart, while orders for them come and are CANCELLED until it is."""
        for shopper, key in self._late:
            if self._stop.wait(self.rng.uniform(1, 8)):
                return
            while not self._stop.is_set():
                status, _ = self._post(shopper, "gateway", "/accounts", None, None,
                                       time.monotonic() + RETRY_SECONDS)
                if status in (201, 409):
                    break
                time.sleep(RETRY_PAUSE)
            # As patient as any deposit (the load's stop waits for it): unconfirmed, it is
            # noted, and sent again once the shop has settled.
            if self._deposit_confirmed(shopper, OPENING_DEPOSIT, key, "gateway"):
                self.say(f"late account opened for {shopper.user_id}")
