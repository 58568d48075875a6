// The HseShop page: signs in through the gateway's /api, keeps the balance and the order list on
// screen, and follows the notifications WebSocket so each order's badge changes the moment it
// is paid or cancelled. Plain browser JavaScript, no build step and no third-party code.
"use strict";

(() => {
  const SESSION_KEY = "hseshop.session";
  const ORDERS_PAGE = 50;
  const RECONNECT_FIRST_MS = 500;
  const RECONNECT_MAX_MS = 10000;
  // A socket turned away (closed 1013, too many, or never opened: a handshake refused 429 is, to
  // the page, a socket closed 1006) backs off to this at most: the pages an address's sockets
  // were refused to would otherwise spend its handshakes a minute between them (the page reads
  // its orders itself meanwhile).
  const RECONNECT_TURNED_AWAY_MAX_MS = 30000;
  // A socket counts as having worked (the next reconnect starts from the shortest wait, and the
  // page's own reads stop) once it has stayed open this long: the gateway may open one and close it
  // at once (1013, too many).
  const SOCKET_WORKED_MS = 5000;
  // A socket ticket not answered by then is given up on (its request aborted), and asked for
  // again later, as one refused: a request held for ever (a proxy, a network gone quiet) kept
  // every later (re)connect from being made.
  const TICKET_WAIT_MS = 10000;
  // A read (a GET) not answered by then is given up on so too, and fails as one with no answer:
  // the shop's load tries again, the poll and the catch-up read again. Held for ever, it kept the
  // shop from loading (no socket, no poll, the balance "…" for good), and each later read of the
  // balance joined it. Well past the 6 s the gateway gives a service by default
  // (UPSTREAM_TIMEOUT_SECONDS, and a second's grace for a COMMIT under way) before it answers 504
  // itself.
  const READ_WAIT_MS = 30000;
  // A write (a POST: a top-up, an order, Open account, signing in or out everywhere) not answered
  // by then is given up on too, its request aborted, and fails as one with no answer: the page says
  // it may have gone through and that pressing again retries it (under the same Idempotency-Key,
  // which the services answer once the first under it is done: shared/idempotency.py). Held for
  // ever (a proxy, a network gone quiet), it kept its button disabled, for good. The gateway
  // answers a write itself within UPSTREAM_TIMEOUT_SECONDS (5 s by default, shared/config.py) and
  // COMMIT_GRACE_SECONDS (1 s, shared/caller_deadline.py) past it, its one resend of a keyed POST
  // made within that same deadline (gateway_app/upstream_http.py, upstream_grpc.py): some 6 s.
  // Well past it, so that a write the gateway is still waiting for is not given up on (a deployment
  // setting UPSTREAM_TIMEOUT_SECONDS near 29 s or above raises this with it: README).
  const WRITE_WAIT_MS = 30000;
  // While its socket has not worked (connecting, refused, as with 1013 or 1011, or reconnecting),
  // the page reads the first page of orders and the balance itself about this often (jittered, as
  // the reconnects are: pages whose sockets one gateway process closed at once, as it does when it
  // loses Redis, would otherwise read in step), but not while its tab is hidden: the gateway may
  // refuse sockets for long (its slots taken, Redis away) while its API answers.
  const POLL_MS = 10000;
  // While its socket works, the page reads the balance itself about this often (jittered), and
  // when its tab is shown or its window focused: deposits, and an account opened, in another tab
  // or on another device, send no notification. And the newest notification's id, as often: a
  // socket whose connection died with no close (a Wi-Fi switched to mobile data with no `offline`
  // event, a laptop woken on another network) looks open for minutes, and brings nothing
  // (checkSocketDelivers).
  const BALANCE_READ_MS = 60000;
  // A notification that read named that the socket has not brought this long after is taken for
  // one the socket will never bring: the socket is replaced. A working socket brings one within
  // some seconds of its commit (at once over Redis, or at the gateway's look in the database every
  // 5 s, SOCKET_RECHECK_SECONDS, when Redis missed it): three times that.
  const SOCKET_DELIVERY_GRACE_MS = 15000;
  // The longest wait a Retry-After given as an HTTP-date (a proxy's, a CDN's: the gateway's are in
  // seconds) puts the page off for. The date is measured from the answer's own Date, where it has
  // one, but a proxy's clock or its setting may be wrong, and without a Date the page's own clock
  // (hours off, on some computers) measures it: a wait of hours would stop every read and socket
  // of the page's for as long. Five minutes is well past the gateway's own windows (a minute, for
  // its rate limits), so a true date is honoured; past it, the page asks again, once, and is told
  // again.
  const RETRY_AFTER_DATE_MAX_MS = 5 * 60 * 1000;
  // The wait a rate-limited socket's close (1013) names, as the gateway words it.
  const TRY_AGAIN_IN = /try again in (\d+) s/i;
  // The longest wait setTimeout keeps (2^31 - 1 ms, some 24.8 days): asked for longer, it fires
  // at once.
  const LONGEST_TIMER_MS = 2 ** 31 - 1;
  const AMOUNT = /^\d{1,10}(\.\d{1,2})?$/;
  const MAX_AMOUNT = 1000000000;  // the services' largest amount, 1,000,000,000.00

  const REASONS = { INSUFFICIENT_FUNDS: "insufficient funds", NO_ACCOUNT: "no account" };
  const STATUS_LABELS = { NEW: "NEW · processing", FINISHED: "FINISHED · paid", CANCELLED: "CANCELLED" };
  const ERROR_TEXT = {
    USERNAME_TAKEN: "That username is taken. Choose another, or sign in.",
    INVALID_CREDENTIALS: "Wrong username or password.",
    ACCOUNT_EXISTS: "You already have an account.",
    ACCOUNT_NOT_FOUND: "You have no account yet: open one first.",
    RATE_LIMITED: "Too many requests.",
  };

  const $ = (id) => document.getElementById(id);

  // --- state -----------------------------------------------------------------------------------

  let session = null;            // {token, username, expiresAt}
  // The orders shown are every order of the user's from the newest down to where nextCursor
  // points (all of them, when it is null): a read of the list never leaves a gap among them.
  const orders = new Map();      // order id -> order
  let nextCursor = null;
  // The ids of the orders shown that a read of the list gave (GET /api/orders), as against those
  // placed on the page and not listed since: a first page read again is shown only where its
  // newest order is none older than theirs, and joins the orders shown only where it reaches one
  // of them (loadOrders).
  const listed = new Set();
  let lastNotificationId = 0;
  let socket = null;
  // The ticket asked for the next socket, while its answer is awaited (connectSocket):
  // {controller}, the AbortController of its request.
  let ticketAsked = null;
  let reconnectTimer = null;
  let reconnectDelay = RECONNECT_FIRST_MS;
  // A reconnect that fell due while the tab was hidden: made when it is shown again.
  let reconnectWhenShown = false;
  // The socket that was open when the network went away (the `offline` event): the network back,
  // it may be dead though it looks open (start).
  let socketWhenOffline = null;
  // The page's own reads while its socket has not worked (pollOrders): {timer, reading}.
  let poll = null;
  // No read is sent and no socket opened before this time (as performance.now() counts it, which
  // a wall clock set back does not stretch): the gateway
  // asked for the pause, in a 429's Retry-After or a rate-limited 1013's "try again in N s". Its
  // limit is the user's, which every read and socket counts against alike: it ends with their
  // session (signOut).
  let notBefore = 0;
  // No socket is opened (nor its ticket asked for) before this time either (performance.now()):
  // a refused ticket's Retry-After (SOCKET_HANDSHAKES_LIMITED: the address's handshakes, a 503
  // NOTIFICATIONS_UNAVAILABLE), and the back-off after a socket turned away (closed 1013, or never
  // opened: a handshake refused), the user's pause not in it. Kept across a session's end: the
  // address's limit is not the user's (whose waits go in notBefore, which the sign-out clears).
  // (A 1013 may be the user's own limit too, their open sockets, SOCKETS_PER_USER, or the
  // gateway process's: its reason is the same for all three, and the page cannot tell them apart.
  // Its back-off, 37.5 s at most, outlives the sign-out whatever turned the socket away.)
  // The network back online (start) does not bring it forward.
  let socketNotBefore = 0;
  let expiryTimer = null;
  let loadTimer = null;
  // The catch-up after a read that failed (catchUpSoon): its timer, and when it is due (as
  // performance.now() counts it).
  let catchUpTimer = null;
  let catchUpDueAt = 0;
  // The error a failed read showed (as shown), which the next read of the orders and the balance
  // through makes good.
  let catchUpMessage = null;
  // The balance read in flight: {again} when the balance may have changed since it was sent (it is
  // then read once more: a burst of notifications costs two reads), {overtaken} when a write's
  // answer has been shown since (its answer, older, is then not shown).
  let balanceRead = null;
  // The read of the first page of orders for those notifications named that the page did not
  // know, in flight: {again} when another was named since it was sent (it is then read once
  // more: a socket back from a long outage replays every notification since, for as many orders).
  let unknownOrdersRead = null;
  // The Idempotency-Keys of a user's attempts whose outcome is not known yet (the signed-in
  // user's, or the last one's, kept for their next sign-in): {username, actions: {action:
  // Map(form's contents -> {key, madeAt})}}, read from sessionStorage.
  let pendingKeys = null;
  // The AbortController of the signed-in session's requests: aborted at its end (signOut), so that
  // none of them, held unanswered, keeps a button disabled (whileBusy) into the next session.
  let sessionRequests = null;
  // The user whose typing the shop's forms hold: cleared when another signs in (clearShopForms).
  let formsFilledBy = null;
  // The final status of each order said in the order announcements (announceStatus), so that each
  // change is said once, however often the list is drawn again.
  const statusesAnnounced = new Map();

  // --- messages ---------------------------------------------------------------------------------

  // The message area is a live region, always rendered (empty, it takes no room: style.css): one
  // made visible and filled in the same step is often not announced by a screen reader.
  function showMessage(text, kind = "error") {
    const box = $("message");
    box.textContent = text;
    box.dataset.kind = kind;
  }

  function clearMessage() {
    $("message").textContent = "";
    delete $("message").dataset.kind;
  }

  function messageShown() {
    return $("message").textContent !== "";
  }

  class ApiError extends Error {
    constructor(status, code, message, details) {
      super(message);
      this.status = status;
      this.code = code;
      this.details = details;
    }
  }

  function describeError(error) {
    if (!(error instanceof ApiError)) return "Something went wrong: " + error.message;
    if (error.status === 0) return "Cannot reach the shop. Check your connection and try again.";
    if (rateLimit(error)) {
      // (The wait as the page takes it, in seconds: never the header as sent, a date perhaps.)
      const waitMs = retryAfterMs(error);
      const wait = waitMs > 0 ? ` Try again in ${Math.ceil(waitMs / 1000)} s.`
                              : " Try again shortly.";
      return ERROR_TEXT.RATE_LIMITED + wait;
    }
    if (error.status === 503 || error.status === 504) {
      return "Part of the shop is not answering right now. Please try again in a moment.";
    }
    if (ERROR_TEXT[error.code]) return ERROR_TEXT[error.code];
    const fields = flattenDetails(error.details);
    return fields.length ? `${error.message} ${fields.join("; ")}` : error.message;
  }

  // Validation details look like {"json": {"amount": ["Must be greater than 0."]}}.
  function flattenDetails(details, prefix = "") {
    if (!details || typeof details !== "object") return [];
    if (Array.isArray(details)) return [`${prefix}: ${details.join(" ")}`];
    return Object.entries(details).flatMap(([key, value]) =>
      flattenDetails(value, ["json", "query", "headers"].includes(key) ? prefix : key));
  }

  // --- HTTP -------------------------------------------------------------------------------------

  // The answer's body; with `replayMark`, {body, replayed}: whether the gateway answered a repeat
  // of an earlier request under the same Idempotency-Key (Idempotent-Replayed: nothing was done
  // this time). Given up on once `signal` aborts, the session it was sent for ends (signOut), or
  // `waitMs` has passed: a read after READ_WAIT_MS, a write after WRITE_WAIT_MS, unless told
  // otherwise. Given up on, it fails as a request with no answer (NETWORK), or, its session
  // ended, as one whose answer nobody here is to be told (SESSION_ENDED).
  async function api(method, path,
                     { body, idempotencyKey, anonymous = false, replayMark = false, signal,
                       waitMs = method === "GET" ? READ_WAIT_MS : WRITE_WAIT_MS } = {}) {
    const headers = { Accept: "application/json" };
    if (body !== undefined) headers["Content-Type"] = "application/json";
    if (!anonymous && session) headers.Authorization = `Bearer ${session.token}`;
    if (idempotencyKey) headers["Idempotency-Key"] = idempotencyKey;
    if (method === "GET" && !anonymous && pauseLeftMs() > 0) throw pausedRead();
    const sentFor = session;
    const givenUpWith = [signal, !anonymous && sessionRequests && sessionRequests.signal];
    let response;
    let data;
    try {
      ({ response, data } = await answerWithin(path, {
        method, headers, body: body === undefined ? undefined : JSON.stringify(body),
      }, givenUpWith.filter(Boolean), waitMs));
    } catch (exc) {
      throw endedSession(sentFor, anonymous) || new ApiError(0, "NETWORK", exc.message);
    }
    const ended = endedSession(sentFor, anonymous);
    if (ended) throw ended;
    if (response.ok) {
      if (!replayMark) return data;
      return { body: data, replayed: response.headers.get("Idempotent-Replayed") === "true" };
    }
    const info = (data && data.error) || {};
    const error = new ApiError(response.status, info.code || `HTTP_${response.status}`,
                               info.message || response.statusText
                                 || `The request failed (HTTP ${response.status}).`,
                               info.details);
    error.retryAfter = response.headers.get("Retry-After");
    error.answeredAt = response.headers.get("Date");
    // The user's limit, or a proxy's in front of the gateway, its Retry-After honoured alike
    // (/api/auth counts the address's instead, and so does a socket ticket refused for the
    // address's socket handshakes: it puts off the socket only, connectSocket).
    if (rateLimit(error) && !anonymous && !path.startsWith("/api/auth/")) {
      pauseFor(retryAfterMs(error));
    }
    if (response.status === 401 && !anonymous) {
      signOut();
      showMessage(error.code === "TOKEN_EXPIRED"
        ? "Your session has expired. Please sign in again."
        : "Please sign in again.");
      error.handled = true;
    }
    throw error;
  }

  // A request's answer, and its body as JSON (null if it holds none): {response, data}. Its request
  // is aborted, and this fails, once one of `signals` aborts or `waitMs` (0: never) passes before
  // the whole answer is in: a request held unanswered (a proxy, a network gone quiet) holds
  // whatever waits for it, for as long as the browser does.
  async function answerWithin(path, init, signals, waitMs) {
    const controller = new AbortController();
    const giveUp = () => controller.abort();
    signals.forEach((signal) => {
      if (signal.aborted) giveUp();
      signal.addEventListener("abort", giveUp);
    });
    const givenUp = waitMs > 0 ? setTimeout(giveUp, waitMs) : null;
    try {
      const response = await fetch(path, { ...init, signal: controller.signal });
      let data = null;
      try {
        data = await response.json();
      } catch (exc) {
        data = null;
      }
      // (Its body cut off by the abort: as a request with no answer, not one with no body.)
      if (controller.signal.aborted) throw new DOMException("Given up on.", "AbortError");
      return { response, data };
    } finally {
      clearTimeout(givenUp);
      signals.forEach((signal) => signal.removeEventListener("abort", giveUp));
    }
  }

  // Puts every read and socket off for `ms` from now, or longer if asked already.
  function pauseFor(ms) {
    notBefore = Math.max(notBefore, performance.now() + ms);
  }

  // How long every read and socket is still put off (0: not).
  function pauseLeftMs() {
    return Math.max(0, notBefore - performance.now());
  }

  // A read refused on the page, unsent, as the gateway would refuse it, before notBefore.
  function pausedRead() {
    const error = new ApiError(429, "RATE_LIMITED", "Too many requests.");
    error.retryAfter = String(Math.ceil(pauseLeftMs() / 1000));
    return error;
  }

  // A failed read the page made of itself, not at a click of the user's (the balance or orders
  // read again after a write or a notification, a catch-up's): refused for the rate limit (by the
  // gateway, or on the page before notBefore), it says nothing, so that the message shown (a
  // write's own, say) stays, and is left to the catch-up, due once the pause is over; any other
  // failure is reported and caught up.
  function backgroundReadFailed(error) {
    if (rateLimited(error)) catchUpSoon(retryAfterMs(error));
    else reportAndCatchUp(error);
  }

  // Refused for the user's rate limit, by the gateway or on the page (pausedRead).
  function rateLimited(error) {
    return rateLimit(error) && !error.handled;
  }

  // A refusal for a rate limit: any 429, the gateway's (RATE_LIMITED, in its JSON error) or one a
  // proxy or load balancer in front of it answered (a body of its own, HTML say, and no code),
  // but the socket ticket's SOCKET_HANDSHAKES_LIMITED, which puts off the socket only (noTicket).
  function rateLimit(error) {
    return error instanceof ApiError && error.status === 429
      && error.code !== "SOCKET_HANDSHAKES_LIMITED";
  }

  // A request asked for a session that has ended since (signed out, perhaps another user signed
  // in): its answer, or its failure, must not show up in, or sign out, whoever is here now.
  function endedSession(sentFor, anonymous) {
    if (anonymous || session === sentFor) return null;
    const ended = new ApiError(0, "SESSION_ENDED", "The session this was asked for has ended.");
    ended.handled = true;
    return ended;
  }

  function report(error) {
    if (!error.handled) showMessage(describeError(error));
  }

  function randomKey() {
    if (window.crypto && crypto.randomUUID) return crypto.randomUUID();
    // randomUUID exists only on https and localhost; getRandomValues works everywhere.
    const bytes = crypto.getRandomValues(new Uint8Array(16));
    bytes[6] = (bytes[6] & 0x0f) | 0x40;
    bytes[8] = (bytes[8] & 0x3f) | 0x80;
    const hex = Array.from(bytes, (b) => b.toString(16).padStart(2, "0")).join("");
    return `${hex.slice(0, 8)}-${hex.slice(8, 12)}-${hex.slice(12, 16)}-${hex.slice(16, 20)}-${hex.slice(20)}`;
  }

  // --- Idempotency-Keys -------------------------------------------------------------------------

  // Each attempt of a form ("deposit", "order") goes out under the key of its contents (as the shop
  // reads them), kept until an answer settles the attempt: pressing again with the same contents,
  // whatever was sent in between and across a reload, retries it under that key, and the shop
  // carries it out once. Kept in this tab's sessionStorage under the user's name (the newest
  // PENDING_KEYS_KEPT of each form, each with the time it was made), across the session's end,
  // whatever ended it (its expiry, a token refused, the sign-out buttons: the page has said that
  // pressing again retries the attempt, never carrying it out twice): the services keep a key for
  // the user, whatever the token, so the same user signed in again in the tab retries under it.
  // Forgotten when an answer settles it, when another user signs in in the tab, and
  // PENDING_KEY_LIFE_MS after it was made (dropped when next read). (sessionStorage is the tab's:
  // a browser brings it back with the tab reopened, or a session restored, so closing the tab does
  // not surely end it. The sign-out buttons keep the keys all the same: forgotten, a retry after
  // signing in again would be carried out twice.)
  const PENDING_KEYS_PREFIX = "hseshop.pending-keys.";  // and the user's name
  const PENDING_KEYS_KEPT = 20;
  // Well within the day the services keep a key (IDEMPOTENCY_KEY_RETENTION_SECONDS, which the page
  // cannot read): a retry under a key they have pruned is carried out as a new request anyway.
  const PENDING_KEY_LIFE_MS = 12 * 60 * 60 * 1000;
  // A key as randomKey makes it: what is read back from storage is checked against it.
  const KEY_PATTERN = /^[0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12}$/;

  // What a failed attempt tells of itself (attemptOutcome).
  const SETTLED = "settled";            // refused for what it holds: its key is done with
  const UNKNOWN = "unknown";            // it may have been carried out: its key is kept
  const NOTHING_DONE = "nothing done";  // not this time, but an earlier one under its key may
                                        // have been: its key is kept

  // Sends a form's request under the key of the attempt with its contents (recordAttempt), and
  // forgets the attempt when the answer settles it; the answer as api() gives it with replayMark.
  async function sendUnderAttemptKey(action, contents, path, body) {
    const fingerprint = JSON.stringify(contents);
    const idempotencyKey = recordAttempt(action, fingerprint);
    try {
      const answer = await api("POST", path, { body, idempotencyKey, replayMark: true });
      forgetAttempt(action, fingerprint);
      return answer;
    } catch (error) {
      if (attemptOutcome(error) === SETTLED) forgetAttempt(action, fingerprint);
      throw error;
    }
  }

  // SETTLED: a 4xx refusal of what was sent; the same contents under the same key are refused so
  // again, since one carried out under it is answered with its replay (a refusal the services made
  // of its work, a top-up's 404 ACCOUNT_NOT_FOUND say, is kept under the key and replayed too: the
  // same contents pressed once the account is open go under a new key). NOTHING_DONE: a 429 or a
  // 401 (the token refused: the user may sign in again and retry), the gateway's 503
  // SERVICE_UNAVAILABLE (for a service it never sent the request to: a connection lost after it
  // went is a 502, over either transport), a service's 503 DATABASE_BUSY (rolled back whole), or
  // an error before it was sent. UNKNOWN: no answer, a session ended before its answer came
  // (api() has it handled: nobody here is told), or any other 5xx: the gateway's 502 or 504, a
  // service's 503 DATABASE_UNAVAILABLE (a commit whose connection was lost may have gone through)
  // or IDEMPOTENCY_KEY_IN_USE (the key held by another transaction: most likely an earlier send
  // under it, still in progress).
  // (A 504 CALLER_GAVE_UP says this send did nothing, and found nothing done under its key; an
  // earlier send under it still on its way may yet be carried out: the key is kept.)
  function attemptOutcome(error) {
    if (!(error instanceof ApiError)) return NOTHING_DONE;
    if ([401, 429].includes(error.status)) return NOTHING_DONE;
    if (error.status >= 400 && error.status < 500) return SETTLED;
    if (error.status === 503 && ["SERVICE_UNAVAILABLE", "DATABASE_BUSY"].includes(error.code)) {
      return NOTHING_DONE;
    }
    return UNKNOWN;
  }

  // The key an attempt with these contents goes out under: the pending one's, or a new one. The
  // attempt becomes the form's newest (the oldest past PENDING_KEYS_KEPT is dropped), and is saved
  // before it is sent: a reload while it is under way keeps it.
  function recordAttempt(action, fingerprint) {
    const attempts = pendingAttemptsOf(action);
    const attempt = attempts.get(fingerprint) || { key: randomKey(), madeAt: Date.now() };
    attempts.delete(fingerprint);  // (set again below: the newest is kept longest)
    attempts.set(fingerprint, attempt);
    while (attempts.size > PENDING_KEYS_KEPT) attempts.delete(attempts.keys().next().value);
    savePendingKeys();
    return attempt.key;
  }

  // (Only ever for the signed-in user: api() answers for the session it was sent for alone.)
  function forgetAttempt(action, fingerprint) {
    pendingAttemptsOf(action).delete(fingerprint);
    savePendingKeys();
  }

  // The signed-in user's pending attempts of the form `action`: its contents -> {key, madeAt},
  // oldest first, none made over PENDING_KEY_LIFE_MS ago.
  function pendingAttemptsOf(action) {
    if (!pendingKeys || pendingKeys.username !== session.username) {
      pendingKeys = { username: session.username, actions: storedPendingKeys(session.username) };
    }
    const attempts = pendingKeys.actions[action] || new Map();
    pendingKeys.actions[action] = attempts;
    attempts.forEach((attempt, fingerprint) => {
      if (!recentlyMade(attempt.madeAt)) attempts.delete(fingerprint);
    });
    return attempts;
  }

  // Made within PENDING_KEY_LIFE_MS of now, either way: a clock set back does not drop a key.
  function recentlyMade(madeAt) {
    return Number.isFinite(madeAt) && Math.abs(Date.now() - madeAt) < PENDING_KEY_LIFE_MS;
  }

  function storedPendingKeys(username) {
    const actions = {};
    try {
      const saved = JSON.parse(sessionStorage.getItem(PENDING_KEYS_PREFIX + username)) || {};
      Object.entries(saved).forEach(([action, entries]) => {
        if (!Array.isArray(entries)) return;
        const valid = entries.filter(storedAttempt).slice(-PENDING_KEYS_KEPT);
        actions[action] = new Map(valid.map(([fingerprint, key, madeAt]) =>
          [fingerprint, { key, madeAt }]));
      });
    } catch (exc) {
      // unreadable keys are the same as none
    }
    return actions;
  }

  // An attempt as savePendingKeys saves it, [contents, key, made at], its key one randomKey makes.
  function storedAttempt(entry) {
    return Array.isArray(entry) && entry.length === 3 && typeof entry[0] === "string"
      && typeof entry[1] === "string" && KEY_PATTERN.test(entry[1]) && recentlyMade(entry[2]);
  }

  function savePendingKeys() {
    const saved = {};
    Object.entries(pendingKeys.actions).forEach(([action, attempts]) => {
      if (attempts.size) {
        saved[action] = Array.from(attempts, ([fingerprint, { key, madeAt }]) =>
          [fingerprint, key, madeAt]);
      }
    });
    const name = PENDING_KEYS_PREFIX + pendingKeys.username;
    try {
      if (Object.keys(saved).length) sessionStorage.setItem(name, JSON.stringify(saved));
      else sessionStorage.removeItem(name);
    } catch (exc) {
      // Storage full or refused: the keys are kept on this page only. What was saved before goes:
      // out of date, it may hold a settled key, under which a new attempt with its contents would
      // be taken, after a reload, for a replay of the settled one.
      sessionStorage.removeItem(name);
    }
  }

  // Forgets the keys this tab keeps of users other than `keptFor` (the user signing in).
  function forgetOthersPendingKeys(keptFor) {
    if (pendingKeys && pendingKeys.username !== keptFor) pendingKeys = null;
    const kept = PENDING_KEYS_PREFIX + keptFor;
    Object.keys(sessionStorage)
      .filter((name) => name.startsWith(PENDING_KEYS_PREFIX) && name !== kept)
      .forEach((name) => sessionStorage.removeItem(name));
  }

  // Runs a form's request with its submit buttons disabled, so one click sends one request. The
  // request is given up on at the latest after WRITE_WAIT_MS, or when the session ends (api):
  // the buttons are never left disabled.
  async function whileBusy(buttons, work) {
    const all = Array.isArray(buttons) ? buttons : [buttons];
    if (all.some((button) => button.disabled)) return;
    all.forEach((button) => { button.disabled = true; });
    try {
      await work();
    } catch (error) {
      report(error);
    } finally {
      all.forEach((button) => { button.disabled = false; });
    }
  }

  // --- session ----------------------------------------------------------------------------------

  function loadSession() {
    try {
      const saved = JSON.parse(sessionStorage.getItem(SESSION_KEY));
      if (saved && saved.token && saved.expiresAt > Date.now()) return saved;
    } catch (exc) {
      // an unreadable saved session is the same as none
    }
    sessionStorage.removeItem(SESSION_KEY);
    return null;
  }

  function startSession(body) {
    session = {
      token: body.access_token,
      username: body.username,
      expiresAt: Date.now() + body.expires_in * 1000,
    };
    sessionStorage.setItem(SESSION_KEY, JSON.stringify(session));
    forgetOthersPendingKeys(session.username);  // another user's, kept since a sign-out of theirs
    enterShop();
  }

  // The page signs itself out when the token expires (the gateway closes its socket then too). A
  // token that lasts longer than a timer can wait (AUTH_TOKEN_TTL_SECONDS allows 30 days, say) is
  // waited for in as many waits as it takes: a wait cut to LONGEST_TIMER_MS ends with the token
  // still good, and the next one is set.
  function watchExpiry() {
    clearTimeout(expiryTimer);
    expiryTimer = setTimeout(() => {
      if (Date.now() < session.expiresAt) {
        watchExpiry();
        return;
      }
      signOut();
      showMessage("Your session has expired. Please sign in again.");
    }, Math.min(session.expiresAt - Date.now(), LONGEST_TIMER_MS));
  }

  // The sign-out button: the gateway is told, and refuses the token from then on. The page signs
  // out at once, without waiting for its answer; the page keeps the token to tell it again a few
  // times if it could not be told, later each time (never sooner than a Retry-After says), then
  // says so (the token works until it expires).
  const SIGN_OUT_RETRIES_MS = [1000, 4000];

  function onSignOut() {
    const token = session && session.token;
    signOut();
    clearShopForms();
    clearMessage();
    if (token) tellTheGatewayOfSignOut(token, 0);
  }

  async function tellTheGatewayOfSignOut(token, retried) {
    let waitMs = SIGN_OUT_RETRIES_MS[retried];
    try {
      const response = await fetch("/api/auth/logout", {
        method: "POST", keepalive: true, headers: { Authorization: `Bearer ${token}` },
      });
      // 401: the gateway refuses the token already (expired, or signed out in another tab).
      if (response.ok || response.status === 401) return;
      const retryAfter = retryAfterMs({ retryAfter: response.headers.get("Retry-After"),
                                        answeredAt: response.headers.get("Date") });
      if (retryAfter > 0) waitMs = Math.max(waitMs || 0, retryAfter);
    } catch (exc) {
      // no answer: told again below
    }
    if (retried < SIGN_OUT_RETRIES_MS.length) {
      setTimeout(() => tellTheGatewayOfSignOut(token, retried + 1), waitMs);
    } else if (!session) {
      showMessage("Signed out on this page, but the shop could not be told: the session stays"
                  + " valid until it expires.");
    }
  }

  // Signing out everywhere (a lost phone): the page waits for the gateway, and stays signed in if
  // it was not done, so that it can be asked again.
  async function onSignOutEverywhere() {
    await whileBusy($("sign-out-everywhere"), async () => {
      await api("POST", "/api/auth/logout/everywhere");
      signOut();
      clearShopForms();
      showMessage("Signed out on every device and page.", "info");
    });
  }

  // Ends the session on the page, whatever ended it (a sign-out button, the token expired or
  // refused): its requests still in flight are given up on, and what is shown of the user goes.
  // What they typed in the shop's forms stays (it is theirs, and a session expiring as they type
  // must not lose it): the sign-out buttons clear it, and so does another user's sign-in.
  function signOut() {
    session = null;
    sessionStorage.removeItem(SESSION_KEY);
    if (sessionRequests) sessionRequests.abort();
    sessionRequests = null;
    clearTimeout(expiryTimer);
    clearTimeout(loadTimer);
    loadTimer = null;
    clearTimeout(catchUpTimer);
    catchUpTimer = null;
    stopPolling();
    closeSocket();
    notBefore = 0;  // (the user's limit: the next one's is their own)
    orders.clear();
    nextCursor = null;
    listed.clear();
    lastNotificationId = 0;
    balanceRead = null;
    unknownOrdersRead = null;
    $("password").value = "";
    statusesAnnounced.clear();
    $("order-announcements").replaceChildren();
    $("orders").replaceChildren();
    $("balance").textContent = "…";  // as the page starts: nothing known of the next user's account
    delete $("balance").dataset.state;
    $("no-account").hidden = true;
    $("topup-form").hidden = true;
    showAuth();
  }

  // Empties the shop's forms, which hold what the signed-in user typed.
  function clearShopForms() {
    ["topup-amount", "order-amount", "order-description"].forEach((id) => { $(id).value = ""; });
    formsFilledBy = null;
  }

  function showAuth() {
    $("session").hidden = true;
    $("shop-section").hidden = true;
    $("auth-section").hidden = false;
    $("username").focus();
  }

  async function enterShop() {
    sessionRequests = new AbortController();
    if (formsFilledBy !== session.username) clearShopForms();  // another user's typing
    formsFilledBy = session.username;
    $("current-user").textContent = session.username;
    $("session").hidden = false;
    $("auth-section").hidden = true;
    $("shop-section").hidden = false;
    watchExpiry();
    renderOrders();
    await loadShop();
  }

  async function loadShop(attempt = 0) {
    loadTimer = null;
    try {
      // Learn the last notification first, then read the orders: anything that changes after
      // that id is replayed by the socket, so no status change can fall between the two reads.
      await catchUpNotificationId();
      await Promise.all([refreshBalance(), loadOrders()]);
      if (attempt > 0) clearMessage();
      connectSocket();
    } catch (error) {
      report(error);
      if (session && !error.handled) {
        // Backing off, jittered, but never sooner than the gateway asked (a 429's Retry-After,
        // say: a request before then is refused again, and counted).
        const backoff = Math.min(RECONNECT_FIRST_MS * 2 ** (attempt + 1), RECONNECT_MAX_MS);
        const asked = Math.max(retryAfterMs(error), pauseLeftMs());
        loadTimer = setTimeout(() => loadShop(attempt + 1), notSoonerThan(jittered(backoff), asked));
      }
    }
  }

  // How long an answer asked the page to wait before asking again: its Retry-After, in seconds
  // (the gateway's, no more than a day), at most the longest wait setTimeout keeps (longer, it
  // fires at once), or an HTTP-date (a proxy's, say): the time from the answer's Date to it (both
  // by the clock of whoever answered: the page's own may be hours off), or, the answer having no
  // Date, from now by the page's clock; 0 if it has passed, at most RETRY_AFTER_DATE_MAX_MS.
  function retryAfterMs(error) {
    const value = String((error && error.retryAfter) || "").trim();
    if (!value) return 0;
    const seconds = Number(value);
    let ms;
    if (Number.isNaN(seconds)) {
      const answeredAt = Date.parse((error && error.answeredAt) || "");
      ms = Math.min(Date.parse(value) - (Number.isFinite(answeredAt) ? answeredAt : Date.now()),
                    RETRY_AFTER_DATE_MAX_MS);
    } else {
      ms = seconds * 1000;
    }
    if (!Number.isFinite(ms) || ms <= 0) return 0;
    return Math.min(ms, LONGEST_TIMER_MS);
  }

  // Whether the gateway takes the password's length (gateway_app/auth.py, PasswordLength): 8 to
  // 128 characters (code points, not UTF-16 units) of its NFKC form, the one it is hashed in, or,
  // signing in, as typed (a password set before the gateway normalised them was counted so).
  function passwordLengthFits(password, mode) {
    const fits = (text) => [...text].length >= 8 && [...text].length <= 128;
    return fits(password.normalize("NFKC")) || (mode === "login" && fits(password));
  }

  async function onAuthSubmit(event) {
    event.preventDefault();
    const mode = event.submitter && event.submitter.value === "register" ? "register" : "login";
    const username = $("username").value.trim();
    const password = $("password").value;
    if (!/^[A-Za-z0-9_.-]{1,64}$/.test(username)) {
      showMessage("Username: 1 to 64 letters, digits, underscores, dots or hyphens.");
      return;
    }
    if (!passwordLengthFits(password, mode)) {
      showMessage("Password: 8 to 128 characters.");
      return;
    }
    await whileBusy([$("sign-in"), $("sign-up")], async () => {
      let body;
      try {
        body = await api("POST", `/api/auth/${mode}`, {
          body: { username, password }, anonymous: true,
        });
      } catch (error) {
        // A wrong password is retyped; any other failure (no answer, a 429, a 503, the username
        // taken) keeps it, so that pressing again, or Sign in instead, needs no retyping.
        if (error.code === "INVALID_CREDENTIALS") $("password").value = "";
        throw error;
      }
      // The password is not kept in the page once it has done its work (the hidden form stays
      // in the document all the session long).
      $("password").value = "";
      clearMessage();
      if (mode === "register") showMessage("Welcome! Open your account to get started.", "info");
      startSession(body);
    });
  }

  // --- account ----------------------------------------------------------------------------------

  function showAccount(account) {
    const exists = account !== null;
    $("balance").textContent = exists ? account.balance : "no account";
    $("balance").dataset.state = exists ? "open" : "none";
    $("no-account").hidden = exists;
    $("topup-form").hidden = !exists;
  }

  // Reads the balance, or joins the read in flight, which then reads again: what is shown is
  // never older than the last change the page has heard of.
  function refreshBalance() {
    if (balanceRead) {
      balanceRead.again = true;
      return balanceRead.promise;
    }
    const read = { again: false, overtaken: false };
    read.promise = (async () => {
      try {
        do {
          read.again = false;
          read.overtaken = false;
          const account = await readAccount();
          if (balanceRead !== read) return;  // signed out meanwhile
          if (!read.overtaken) showAccount(account);
        } while (read.again);
      } finally {
        if (balanceRead === read) balanceRead = null;
      }
    })();
    balanceRead = read;
    return read.promise;
  }

  async function readAccount() {
    try {
      return await api("GET", "/api/accounts/balance");
    } catch (error) {
      if (error.code !== "ACCOUNT_NOT_FOUND") throw error;
      return null;
    }
  }

  // An account as a write answered it: shown at once, and a read in flight is read again.
  function showAnsweredAccount(account) {
    showAccount(account);
    if (balanceRead) {
      balanceRead.overtaken = true;
      balanceRead.again = true;
    }
  }

  async function onOpenAccount() {
    await whileBusy($("open-account"), async () => {
      try {
        showAnsweredAccount(await api("POST", "/api/accounts"));
        showMessage("Your account is open.", "info");
      } catch (error) {
        if (error.code !== "ACCOUNT_EXISTS") throw error;
        // Opened already (in another tab, say): said, and its balance read as the page's other
        // reads are, put off quietly while the page is paused for the rate limit.
        showMessage(ERROR_TEXT.ACCOUNT_EXISTS, "info");
        await refreshBalance().catch(backgroundReadFailed);
      }
    });
  }

  function validAmount(amount) {
    return AMOUNT.test(amount) && Number(amount) > 0 && Number(amount) <= MAX_AMOUNT;
  }

  // An amount as typed: "12,50" is 12.50 (a phone's decimal keypad in a comma locale offers no
  // point); a comma beside a point, or before three digits, stays as typed, and is refused.
  function typedAmount(field) {
    const typed = $(field).value.trim();
    return /^\d{1,10},\d{1,2}$/.test(typed) ? typed.replace(",", ".") : typed;
  }

  // An amount as the shop reads it, for telling one form's contents from another's: "12.5"
  // retyped as "12.50" is the same top-up, retried under the same key. (Exact: a valid amount
  // has at most 10 digits before its point and 2 after.)
  function sameAmount(amount) {
    return Number(amount).toFixed(2);
  }

  async function onTopUp(event) {
    event.preventDefault();
    const amount = typedAmount("topup-amount");
    if (!validAmount(amount)) {
      showMessage("Enter a top-up amount above 0 and at most 1,000,000,000, with at most two "
                  + "decimals, e.g. 100 or 12.50.");
      return;
    }
    const said = sameAmount(amount);  // as the shop writes it: "0012" is 12.00
    await whileBusy($("topup-submit"), async () => {
      let answer;
      try {
        answer = await sendUnderAttemptKey("deposit", { amount: sameAmount(amount) },
                                           "/api/accounts/deposit", { amount });
      } catch (error) {
        if (error.handled || attemptOutcome(error) !== UNKNOWN) throw error;
        // It may have gone through: show the balance as it is now, and say what pressing again
        // does (the same top-up, under the same key: never counted twice).
        refreshBalance().catch(backgroundReadFailed);
        showMessage(`${describeError(error)} The top-up of ${said} may have gone through: the `
                    + "balance above is read again. Pressing Top up again with the same amount "
                    + "retries that top-up; it is never counted twice.");
        return;
      }
      showAnsweredAccount(answer.body);
      $("topup-amount").value = "";
      showMessage(answer.replayed
        ? `The top-up of ${said} had gone through already; it was not counted again.`
        : `Topped up ${said}.`, "info");
      // The answer to a retried top-up is the first one's, its balance as it stood then.
      refreshBalance().catch(backgroundReadFailed);
    });
  }

  // --- orders -----------------------------------------------------------------------------------

  // Newest first; the id breaks ties between orders made in the same instant.
  function newestFirst(a, b) {
    if (a.created_at !== b.created_at) return a.created_at < b.created_at ? 1 : -1;
    return a.id < b.id ? 1 : -1;
  }

  // Statuses only move NEW -> FINISHED/CANCELLED, so a late NEW never replaces a final status. A
  // status the page showed another of is announced.
  function rememberOrder(order) {
    const known = orders.get(order.id);
    if (known && known.status !== "NEW" && order.status === "NEW") return known;
    const merged = { ...known, ...order };
    orders.set(order.id, merged);
    if (known && known.status !== merged.status) announceStatus(merged);
    return merged;
  }

  // Says an order's final status in the order announcements, a live region of its own (the list,
  // drawn again whole on each change, is none: a screen reader would read it all, or nothing),
  // once per order and status.
  const ANNOUNCEMENTS_KEPT = 10;

  function announceStatus(order) {
    if (order.status === "NEW" || statusesAnnounced.get(order.id) === order.status) return;
    statusesAnnounced.set(order.id, order.status);
    const line = document.createElement("p");
    line.textContent = `Order ${order.amount} '${order.description || "(no description)"}': `
      + badgeText(order);
    const log = $("order-announcements");
    log.append(line);
    while (log.children.length > ANNOUNCEMENTS_KEPT) log.firstElementChild.remove();
  }

  function badgeText(order) {
    const label = STATUS_LABELS[order.status] || order.status;
    if (order.status !== "CANCELLED" || !order.reason) return label;
    return `${label} · ${REASONS[order.reason] || order.reason}`;
  }

  function renderOrder(order) {
    const item = document.createElement("li");
    item.className = "order";
    item.dataset.testid = "order";
    item.dataset.orderId = order.id;
    item.id = `order-${order.id}`;

    const main = document.createElement("div");
    main.className = "order-main";
    const amount = document.createElement("span");
    amount.className = "order-amount";
    amount.dataset.testid = "order-amount";
    amount.textContent = order.amount;
    const description = document.createElement("span");
    description.className = "order-description";
    description.dataset.testid = "order-description";
    description.textContent = order.description || "(no description)";
    main.append(amount, description);

    const meta = document.createElement("div");
    meta.className = "order-meta";
    const when = document.createElement("time");
    when.dateTime = order.created_at;
    when.textContent = new Date(order.created_at).toLocaleString();
    const badge = document.createElement("span");
    badge.className = "badge";
    badge.dataset.testid = "order-status";
    badge.dataset.status = order.status;
    badge.dataset.reason = order.reason || "";
    badge.textContent = badgeText(order);
    meta.append(when, badge);

    item.append(main, meta);
    return item;
  }

  function renderOrders() {
    const list = $("orders");
    const sorted = [...orders.values()].sort(newestFirst);
    list.replaceChildren(...sorted.map(renderOrder));
    $("orders-empty").hidden = sorted.length > 0;
    $("orders-more").hidden = !nextCursor;
  }

  // Reads the first page of orders (`cursor` null: the shop's load, and every read again after a
  // change the page missed), or the page after the orders shown (Show older orders), and shows it.
  async function loadOrders(cursor = null) {
    const query = new URLSearchParams({ limit: String(ORDERS_PAGE) });
    if (cursor) query.set("cursor", cursor);
    const page = await api("GET", `/api/orders?${query}`);
    if (cursor) {
      // (The list started again from a first page meanwhile: its end is where older ones follow.)
      if (cursor !== nextCursor) return;
      nextCursor = page.next_cursor || null;
    } else {
      if (readBeforeListedOrders(page)) {
        // (Its statuses are taken for the orders shown all the same: those below the page read
        // after it were last read before it. A final status never goes back to NEW.)
        page.items.filter((order) => orders.has(order.id)).forEach(rememberOrder);
        renderOrders();
        return;
      }
      if (!reachesListedOrders(page)) startListAgainAt(page);
    }
    page.items.forEach((order) => {
      rememberOrder(order);
      listed.add(order.id);
    });
    renderOrders();
  }

  // Whether a first page was read from the orders as they stood before those listed were read:
  // its newest is older than the newest listed (or it has none). The gateway reads the orders when
  // it handles a read, not when the page asks, so a read asked first (held on a slow link) can
  // be answered from newer orders than one asked after it, and come first. Shown, such a page
  // could end the list at its own oldest, below orders the list had started again without (the
  // orders between missing for good).
  function readBeforeListedOrders(page) {
    const newestListed = listedOrders()[0];
    const newest = page.items[0];
    return Boolean(newestListed && (!newest || newestFirst(newest, newestListed) > 0));
  }

  // The orders shown that a read of the list gave, newest first.
  function listedOrders() {
    return [...orders.values()].filter((order) => listed.has(order.id)).sort(newestFirst);
  }

  // Whether a first page read again reaches the orders listed before: its oldest is one of them.
  // Every order placed since is then in it (one user's orders are listed in the order they were
  // placed in), and the orders shown go on below it as they were, down to where they ended. Not
  // so at the first read, nor where more orders than a page holds were placed elsewhere (another
  // tab, the API, another device) since the last read, as while the page's socket was away: the
  // ones past the page would be missing between it and those shown, for good.
  function reachesListedOrders(page) {
    const oldest = page.items[page.items.length - 1];
    return Boolean(page.next_cursor && oldest && listed.has(oldest.id));
  }

  // Whether `order` is older than every order listed while older ones are left to Show older
  // orders: it belongs where that goes on, not among the orders shown (below them, it would
  // stand under the orders between, missing).
  function belowListedOrders(order) {
    const oldestListed = listedOrders().at(-1);
    return Boolean(nextCursor && oldestListed && newestFirst(order, oldestListed) > 0);
  }

  // The orders shown start again from this first page, as at the shop's load: those older than
  // its oldest go (orders missed may lie between), and Show older orders goes on from its end.
  // (Those newer, placed on the page after the page was read, stay.) A page that is the whole
  // list (no next_cursor) starts it again so too: it leaves nothing older out.
  function startListAgainAt(page) {
    const oldest = page.items[page.items.length - 1];
    nextCursor = page.next_cursor || null;
    if (!oldest) return;
    orders.forEach((order, id) => {
      if (newestFirst(order, oldest) > 0) {
        orders.delete(id);
        listed.delete(id);
      }
    });
  }

  async function onShowMore() {
    await whileBusy($("orders-more"), () => loadOrders(nextCursor));
  }

  async function onPlaceOrder(event) {
    event.preventDefault();
    const amount = typedAmount("order-amount");
    const description = $("order-description").value.trim();
    if (!validAmount(amount)) {
      showMessage("Enter an order amount above 0 and at most 1,000,000,000, with at most two "
                  + "decimals, e.g. 30 or 9.99.");
      return;
    }
    await whileBusy($("order-submit"), async () => {
      let answer;
      try {
        answer = await sendUnderAttemptKey("order", { amount: sameAmount(amount), description },
                                           "/api/orders", { amount, description });
      } catch (error) {
        if (error.handled || attemptOutcome(error) !== UNKNOWN) throw error;
        // It may have been placed: read the orders again, and say what pressing again does (the
        // same order, under the same key: never placed twice).
        loadOrders().catch(backgroundReadFailed);
        showMessage(`${describeError(error)} The order for ${sameAmount(amount)} may have been `
                    + "placed: the orders below are read again. Pressing Place order again with "
                    + "the same amount and description retries that order; it is never placed "
                    + "twice.");
        return;
      }
      const order = answer.body;
      // (Not shown where Show older orders goes on above it: as where the list started again,
      // while the answer was on its way, from a first page of orders placed elsewhere meanwhile.)
      const shown = !belowListedOrders(order);
      if (shown) rememberOrder(order);
      renderOrders();
      const amongOlder = "Show older orders shows it";
      if (answer.replayed) {
        // The answer to a retry of an order that went through though its answer was lost (the
        // gateway's Idempotent-Replayed). Its key is dropped: pressing again places another.
        showMessage(`That order for ${order.amount} was placed already `
                    + `(${shown ? "shown below" : amongOlder}). Press `
                    + "Place order again to place another.", "info");
        return;
      }
      $("order-amount").value = "";
      $("order-description").value = "";
      showMessage(`Order for ${order.amount} placed; `
                  + `${shown ? "its status updates below" : amongOlder}.`, "info");
    });
  }

  // --- live notifications -----------------------------------------------------------------------

  async function catchUpNotificationId() {
    const newest = await api("GET", "/api/notifications/newest");
    lastNotificationId = Math.max(lastNotificationId, newest.id);
  }

  function setLive(state) {
    $("live-status").dataset.state = state;
    $("live-status").textContent = state;
  }

  // Each socket is opened with a ticket of its own, asked for just before (a ticket is good for
  // one socket, for some seconds): the token is never written in a URL, where proxies log it.
  function connectSocket() {
    if (!session || socket || ticketAsked) return;
    clearTimeout(reconnectTimer);
    reconnectTimer = null;
    // Until the socket works, the page reads the orders itself: one stuck connecting never closes.
    pollOrders();
    // (Opened now, it would be refused, and counted.)
    const waitMs = Math.max(pauseLeftMs(), socketNotBefore - performance.now());
    if (waitMs > 0) {
      setLive("reconnecting");
      reconnectIn(waitMs);
      return;
    }
    setLive("connecting");
    const asked = { controller: new AbortController() };
    ticketAsked = asked;
    api("POST", "/api/notifications/tickets", {
      signal: asked.controller.signal, waitMs: TICKET_WAIT_MS,
    }).then(
      (answer) => {
        if (ticketAsked !== asked) return;  // (signed out, or the socket closed, meanwhile)
        ticketAsked = null;
        if (!answer || typeof answer.ticket !== "string" || !answer.ticket) {
          // (a 201 that is no ticket: something in the way answered it, say)
          noTicket(new ApiError(0, "NO_TICKET", "The gateway gave no ticket."));
          return;
        }
        openSocket(answer.ticket);
      }, (error) => {
        if (ticketAsked !== asked) return;
        ticketAsked = null;
        noTicket(error);  // (aborted, TICKET_WAIT_MS passed: a NETWORK error)
      });
  }

  // No ticket was given: no socket is tried (the page goes on reading its orders itself, as for
  // any socket that does not work), and the next ticket is asked for later. Refused for its
  // address's socket handshakes (SOCKET_HANDSHAKES_LIMITED), its Retry-After puts off the socket
  // only (a handshake now would be refused 429, which a page cannot read); the user's rate limit
  // (or a proxy's 429) has put off every read and socket already, in the user's pause (api), which
  // their sign-out ends. Redis away (503 NOTIFICATIONS_UNAVAILABLE), no socket would work either,
  // with a ticket or with the token in its URL: the page polls. Only the address's waits (those
  // two) go into socketNotBefore, which outlives the session: any other Retry-After puts off this
  // session's next ticket alone (its reconnect timer, which the sign-out clears).
  function noTicket(error) {
    if (error.handled || !session) return;  // (a 401: signed out)
    setLive("reconnecting");
    const asked = retryAfterMs(error);
    if (["SOCKET_HANDSHAKES_LIMITED", "NOTIFICATIONS_UNAVAILABLE"].includes(error.code)) {
      socketNotBefore = Math.max(socketNotBefore, performance.now() + asked);
    }
    scheduleReconnect(RECONNECT_TURNED_AWAY_MAX_MS, asked);
  }

  function openSocket(ticket) {
    const scheme = location.protocol === "https:" ? "wss:" : "ws:";
    const query = new URLSearchParams({ ticket, after: String(lastNotificationId) });
    const ws = new WebSocket(`${scheme}//${location.host}/api/notifications/ws?${query}`);
    socket = ws;
    setLive("connecting");
    let opened = false;
    ws.onopen = () => {
      if (socket !== ws) return;
      opened = true;
      setLive("live");
      setTimeout(() => {
        if (socket === ws) onSocketWorked();
      }, SOCKET_WORKED_MS);
    };
    ws.onmessage = (event) => {
      if (socket !== ws) return;
      let notification;
      try {
        notification = JSON.parse(event.data);
      } catch (exc) {
        return;
      }
      onNotification(notification);
    };
    ws.onclose = (event) => {
      if (socket !== ws) return;
      socket = null;
      if (!session) return;
      setLive("reconnecting");
      // 1013 past the user's rate limit names the wait: no read or socket before then.
      const tryAgainIn = event.code === 1013 && TRY_AGAIN_IN.exec(event.reason || "");
      if (tryAgainIn) pauseFor(Number(tryAgainIn[1]) * 1000);
      // 1008: the gateway refused the socket (its ticket or token refused, or expired); an API
      // call tells whether the token has expired (and then shows the sign-in form) before trying
      // again (the next ticket's request would tell it too, but reads count the same).
      // (A read the page makes of itself: refused for the rate limit, it says nothing.)
      if (event.code === 1008) refreshBalance().catch(backgroundReadFailed);
      // 1012: its gateway process is stopping (a restart), not failing: another takes the next
      // socket, tried after the shortest wait, jittered. (Not 1001, which the gateway never sends:
      // a proxy closing each socket so soon after it opens would have the page retry every 0.5 s.)
      if (event.code === 1012) reconnectDelay = RECONNECT_FIRST_MS;
      pollOrders();
      const turnedAway = !opened || event.code === 1013;
      // (The back-off alone outlives the session, the address's or not: a 1013 for the
      // address's sockets, the user's (SOCKETS_PER_USER) or the process's says the same. The
      // user's pause, a 1013's "try again in", is theirs, and ends with their session.)
      const backOff = scheduleReconnect(
        turnedAway ? RECONNECT_TURNED_AWAY_MAX_MS : RECONNECT_MAX_MS);
      if (turnedAway) socketNotBefore = Math.max(socketNotBefore, performance.now() + backOff);
    };
  }

  // The socket has stayed open SOCKET_WORKED_MS: the page's own reads stop. What changed while
  // it had none, its socket sends first (it was opened `after` the last notification seen); what
  // a failed read of the poll's showed is left to a catch-up (the socket sends no balance).
  function onSocketWorked() {
    reconnectDelay = RECONNECT_FIRST_MS;
    stopPolling();
    if (failedReadShown()) catchUpSoon();
  }

  // Until a socket works, reads the first page of orders and the balance about every POLL_MS,
  // never sooner than an answer asked (its Retry-After, and notBefore), so that a paid order shows
  // as paid however long the gateway refuses the socket; reconnecting goes on meanwhile, with its
  // backoff. A tick while the tab is hidden reads nothing; the tab shown again reads at once.
  function pollOrders() {
    if (poll || !session) return;
    poll = { timer: null, reading: false };
    pollIn(jittered(POLL_MS));
  }

  // The poll's next read in `delay` ms, or once notBefore has passed.
  function pollIn(delay) {
    const current = poll;
    clearTimeout(current.timer);
    current.timer = setTimeout(async () => {
      if (poll !== current) return;
      if (document.hidden) {
        pollIn(jittered(POLL_MS));
        return;
      }
      if (pauseLeftMs() > 0) {  // asked for since this read was set
        pollIn(0);
        return;
      }
      current.reading = true;
      const failed = await readOrdersAndBalance();
      current.reading = false;
      // (One refused for the rate limit is said nothing of: the next read waits for the pause.)
      failed.filter((error) => !rateLimited(error)).forEach(reportFailedRead);
      if (poll === current) pollIn(Math.max(jittered(POLL_MS), ...failed.map(retryAfterMs)));
    }, Math.max(delay, pauseLeftMs()));
  }

  function stopPolling() {
    if (poll) clearTimeout(poll.timer);
    poll = null;
  }

  // Reads the balance while the socket works and the tab is shown (the poll reads it otherwise),
  // unless a read of it is under way (the tab shown and the window focused come together), or the
  // reads are paused for the rate limit (a read refused so would set one more catch-up).
  function readBalanceWhileLive() {
    if (session && socket && !poll && !document.hidden && !balanceRead && pauseLeftMs() === 0) {
      refreshBalance().catch(backgroundReadFailed);
    }
  }

  // Reads the balance, and checks that the socket still brings the notifications, about every
  // BALANCE_READ_MS while the socket works, for the page's life.
  function readNowAndThen() {
    setTimeout(() => {
      readBalanceWhileLive();
      checkSocketDelivers();
      readNowAndThen();
    }, jittered(BALANCE_READ_MS));
  }

  // While the socket works and the tab is shown, reads the newest notification's id: one newer
  // than the last the page has seen, and still so SOCKET_DELIVERY_GRACE_MS later (it may have been
  // on its way over the socket), has the socket replaced (reconnectNow: never before
  // socketNotBefore or the pause, nor in a hidden tab), and the page catches up as at any
  // reconnect (its next socket is opened after the last id seen). A socket whose connection died
  // with no close and no `offline` event looks open for minutes (the gateway's pings, which would
  // tell, are answered by the browser, unseen by the page): "live" shown, no poll made, a paid
  // order NEW for as long. The socket is left as it is: no message of the page's own goes over it,
  // which third-party clients of the socket's document would not expect. One small read a minute;
  // failed, it says nothing (the next one reads again; a 429 has paused the page, api).
  async function checkSocketDelivers() {
    if (!session || !socket || poll || document.hidden || pauseLeftMs() > 0) return;
    const checked = socket;
    let newest;
    try {
      ({ id: newest } = await api("GET", "/api/notifications/newest"));
    } catch (error) {
      return;
    }
    if (!Number.isSafeInteger(newest) || newest <= lastNotificationId) return;
    setTimeout(() => {
      if (socket === checked && newest > lastNotificationId) reconnectNow();
    }, SOCKET_DELIVERY_GRACE_MS);
  }

  // The tab shown again: its socket still not working, what it missed while hidden, read at once,
  // and the reconnect that fell due meanwhile made; its socket working, the balance read.
  function onVisibilityChange() {
    if (document.hidden) return;
    if (poll && !poll.reading) pollIn(0);
    readBalanceWhileLive();
    if (reconnectWhenShown) {
      reconnectWhenShown = false;
      connectSocket();
    }
  }

  // `ms` give or take a quarter, so that pages do not act in step.
  function jittered(ms) {
    return ms * (0.75 + Math.random() / 2);
  }

  // `ms`, or, when an answer asked for longer (`floorMs`: a Retry-After, the pause), that and up to
  // a quarter more, at random: pages refused together (a gateway process losing Redis closes its
  // sockets at once, and each page's ticket is then refused, Retry-After 5; an address's socket
  // handshakes are counted in windows of a minute, each page told to wait for its end) would
  // otherwise come back in step, the jitter of their own waits lost under the floor.
  function notSoonerThan(ms, floorMs) {
    // (No longer than a timer can wait: a setTimeout past LONGEST_TIMER_MS fires at once.)
    return ms >= floorMs ? ms : Math.min(floorMs * (1 + Math.random() / 4), LONGEST_TIMER_MS);
  }

  // Backing off, each wait twice the last, up to `maxMs`, and `atLeastMs` at least, and the
  // user's pause; the back-off and `atLeastMs` (the wait but for the user's pause), or 0 (none
  // set: one is set already).
  function scheduleReconnect(maxMs, atLeastMs = 0) {
    if (reconnectTimer || !session) return 0;
    const jitteredDelay = jittered(reconnectDelay);
    reconnectDelay = Math.min(reconnectDelay * 2, maxMs);
    const backOff = notSoonerThan(jitteredDelay, atLeastMs);
    reconnectIn(notSoonerThan(backOff, pauseLeftMs()));
    return backOff;
  }

  // Reconnects in `delay` ms, or, the tab hidden then, once it is shown again (no one is looking,
  // and each handshake counts against the address's).
  function reconnectIn(delay) {
    reconnectTimer = setTimeout(() => {
      reconnectTimer = null;
      if (document.hidden) {
        reconnectWhenShown = true;
        return;
      }
      connectSocket();
    }, delay);
  }

  // Drops the socket (its ticket awaited, its handshake under way, its reconnect due later, or
  // open over a network gone since) and connects again, keeping its back-off (reconnectDelay),
  // socketNotBefore and the pause; the tab hidden, once it is shown again (as reconnectIn), the
  // page reading its orders itself meanwhile (pollOrders: not while hidden).
  function reconnectNow() {
    dropSocket();
    if (document.hidden) {
      setLive("reconnecting");
      pollOrders();
      reconnectWhenShown = true;
      return;
    }
    connectSocket();
  }

  function closeSocket() {
    dropSocket();
    reconnectDelay = RECONNECT_FIRST_MS;
    setLive("offline");
  }

  // Drops the socket and whatever would make one: its reconnect due, the one owed to the tab
  // shown, its ticket awaited (aborted), the socket itself (closed, its handlers then passing over
  // it: socket is no longer it).
  function dropSocket() {
    clearTimeout(reconnectTimer);
    reconnectTimer = null;
    reconnectWhenShown = false;
    if (ticketAsked) ticketAsked.controller.abort();
    ticketAsked = null;
    if (socket) {
      const ws = socket;
      socket = null;
      ws.close();
    }
  }

  async function onNotification(notification) {
    if (notification && notification.type === "NotificationsMissed") {
      onNotificationsMissed(notification);
      return;
    }
    if (typeof notification.id !== "number" || notification.id <= lastNotificationId) return;
    lastNotificationId = notification.id;
    if (notification.type !== "OrderStatusChanged") return;
    const change = notification.payload;
    try {
      // Placed elsewhere (another tab) or not yet answered here: the first page of orders is read
      // again, once for however many such orders (readUnknownOrders). The change goes over what
      // it read, which may have been read before it.
      if (!orders.has(change.order_id)) await readUnknownOrders();
      if (orders.has(change.order_id)) {
        // (Announced here too where the read gave the order with its change made already.)
        announceStatus(rememberOrder({
          id: change.order_id, status: change.status, reason: change.reason,
          updated_at: change.updated_at,
        }));
      }
      renderOrders();
    } catch (error) {
      // The change is not lost with the order that could not be read (a 429, a network blip):
      // the first page of orders is read again shortly, every status as it stands then.
      backgroundReadFailed(error);
      return;
    }
    refreshBalance().catch(backgroundReadFailed);  // a FINISHED order has just been paid
  }

  // The gateway pruned notifications after the id the socket went on from (kept 30 days): any
  // order shown, and the balance, may have changed unheard of. The page goes on after the newest
  // pruned (`through`) at once, whatever the reads below do: its next socket, opened after it, is
  // not told again (it read GET /api/notifications/newest for that, and a read refused, a 429
  // with several tabs open or a 503, left every reconnect told again, and reading all again).
  // Then it reads as at the shop's load: the first page of orders, the list started again from
  // it (no order listed before is taken as read since: those below it go, Show older orders
  // reads them again), and the balance. The socket goes on by itself with what was kept. (A
  // gateway of before, in a deploy, says no `through`: the newest id is read then, as before.)
  async function onNotificationsMissed(missed) {
    listed.clear();
    if (Number.isSafeInteger(missed.through)) {
      lastNotificationId = Math.max(lastNotificationId, missed.through);
    } else {
      await catchUpNotificationId().catch(backgroundReadFailed);
    }
    (await readOrdersAndBalance()).forEach(backgroundReadFailed);
  }

  // Reads the first page of orders, or joins the read in flight, which then reads again: an order
  // a notification names is in what it reads, however late it was placed.
  function readUnknownOrders() {
    if (unknownOrdersRead) {
      unknownOrdersRead.again = true;
      return unknownOrdersRead.promise;
    }
    const read = { again: false };
    read.promise = (async () => {
      try {
        do {
          read.again = false;
          await loadOrders();
        } while (read.again && unknownOrdersRead === read);
      } finally {
        if (unknownOrdersRead === read) unknownOrdersRead = null;
      }
    })();
    unknownOrdersRead = read;
    return read.promise;
  }

  function reportAndCatchUp(error) {
    reportFailedRead(error);
    if (!error.handled) catchUpSoon(retryAfterMs(error));
  }

  // Shows what a read failed with, as what the next read of the orders and the balance through
  // makes good (readOrdersAndBalance then clears it).
  function reportFailedRead(error) {
    report(error);
    if (!error.handled) catchUpMessage = $("message").textContent;
  }

  // Reads the first page of orders and the balance again, at once (a catch-up's read or a poll's),
  // and clears what a failed read showed once both are through; the failures.
  async function readOrdersAndBalance() {
    const reads = await Promise.allSettled([loadOrders(), refreshBalance()]);
    const failed = reads.filter((read) => read.status === "rejected").map((read) => read.reason);
    if (!failed.length && failedReadShown()) clearMessage();  // what it reported is made good
    return failed;
  }

  // Whether the message shown is what a failed read reported (reportFailedRead).
  function failedReadShown() {
    return messageShown() && $("message").textContent === catchUpMessage;
  }

  // Reads the first page of orders and the balance again, once: in 5 s, and never sooner than
  // any answer since the last catch-up asked (its Retry-After; a request before then is refused
  // again, and counted). A later call can put the catch-up off, never bring it forward.
  function catchUpSoon(retryAfter = 0) {
    if (!session) return;
    const dueAt = performance.now() + Math.max(RECONNECT_MAX_MS / 2, retryAfter, pauseLeftMs());
    if (catchUpTimer && dueAt <= catchUpDueAt) return;
    clearTimeout(catchUpTimer);
    catchUpDueAt = dueAt;
    catchUpTimer = setTimeout(async () => {
      catchUpTimer = null;
      // Both reads' failures count: the later Retry-After of the two decides the next catch-up.
      (await readOrdersAndBalance()).forEach(backgroundReadFailed);
    }, dueAt - performance.now());
  }

  // --- start ------------------------------------------------------------------------------------

  function start() {
    $("auth-form").addEventListener("submit", onAuthSubmit);
    $("sign-out").addEventListener("click", onSignOut);
    $("sign-out-everywhere").addEventListener("click", onSignOutEverywhere);
    $("open-account").addEventListener("click", onOpenAccount);
    $("topup-form").addEventListener("submit", onTopUp);
    $("order-form").addEventListener("submit", onPlaceOrder);
    $("orders-more").addEventListener("click", onShowMore);
    document.addEventListener("visibilitychange", onVisibilityChange);
    window.addEventListener("focus", readBalanceWhileLive);
    readNowAndThen();
    // A network that went away and came back can leave the request for a socket's ticket held,
    // unanswered, or its handshake stuck on the way, or the socket waiting to reconnect after a
    // network error: a socket not open is made again at once (it catches up from the last id
    // seen), never before socketNotBefore or the user's pause, nor in a hidden tab. So is one
    // that was open when the network went (the `offline` event): its connection may be dead (a
    // Wi-Fi switched, a new address) and still look open for minutes, the page sending nothing of
    // its own to find out (it answers the gateway's pings, which the gateway gives up on, closing
    // its end), "live" shown and no poll made meanwhile. An open socket with no `offline` before
    // is kept (`online` comes with other network changes, and each socket costs one of the
    // address's handshakes).
    window.addEventListener("offline", () => {
      if (socket && socket.readyState === WebSocket.OPEN) socketWhenOffline = socket;
    });
    window.addEventListener("online", () => {
      const wentOffline = socket !== null && socket === socketWhenOffline;
      socketWhenOffline = null;
      // (still loading, or signed out)
      if (!session || (!socket && !reconnectTimer && !ticketAsked)) return;
      if (socket && socket.readyState === WebSocket.OPEN && !wentOffline) return;
      reconnectNow();
    });
    session = loadSession();
    if (session) enterShop();
    else showAuth();
  }

  start();
})();
