"""Parked inbox messages, for an operator: list them, and hand them back to be handled once what
parked them is mended.

    python -m tasks.parked list orders                  # the newest 50 parked (--limit N)
    python -m tasks.parked replay payments ID [ID ...]  # or --all

A message is parked after INBOX_MAX_ATTEMPTS failed tries, or at once when it cannot succeed as
things stand (an unknown order, a payload that breaks its contract, no handler for its type).
Replaying clears its park and its attempts and dispatches it to the service's worker, where it is
handled like a new message, and still at most once: its handler runs under a lock on its inbox
row and marks it processed in the same transaction. A record that could not even be parsed holds
no event to hand a handler, and stays parked.
"""

from __future__ import annotations

import argparse
import sys
import uuid

from shared.config import SERVICES
from shared.db import transaction
from shared.inbox import parked_messages, unpark_messages
from tasks.inbox import dispatch_inbox_messages
from tasks.services import service_app


def list_parked(service: str, limit: int) -> None:
    with service_app(service).app_context(), transaction() as session:
        for message in parked_messages(session, limit):
            where = f"{message.topic}[{message.partition}]@{message.offset}"
            error = (message.last_error or "").replace("\n", " ")[:200]
            print(f"{message.message_id}  {message.type or '(unparsed)'}  {where}"
                  f"  parked {message.parked_at.isoformat()}  attempts {message.attempts}"
                  f"  {error}")


def replay(service: str, message_ids: list[uuid.UUID] | None) -> list[uuid.UUID]:
    """Unpark the messages (every replayable one when `message_ids` is None) and dispatch them;
    returns the ids replayed."""
    with service_app(service).app_context():
        with transaction() as session:
            replayed = unpark_messages(session, message_ids)
        dispatch_inbox_messages(service, replayed)
    return replayed


def _positive(text: str) -> int:
    number = int(text)
    if number < 1:
        raise argparse.ArgumentTypeError(f"{text} is not 1 or more")
    return number


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m tasks.parked", description=__doc__.split(
        "\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    commands = parser.add_subparsers(dest="command", required=True)
    listing = commands.add_parser("list", help="the newest parked messages")
    listing.add_argument("service", choices=SERVICES)
    listing.add_argument("--limit", type=_positive, default=50)
    replaying = commands.add_parser("replay", help="hand parked messages back to be handled")
    replaying.add_argument("service", choices=SERVICES)
    replaying.add_argument("message_ids", nargs="*", type=uuid.UUID, metavar="MESSAGE_ID")
    replaying.add_argument("--all", action="store_true", help="every parked message")
    args = parser.parse_args(argv)
    if args.command == "list":
        list_parked(args.service, args.limit)
        return 0
    if bool(args.message_ids) == args.all:
        replaying.error("name the messages, or give --all")
    replayed = replay(args.service, None if args.all else args.message_ids)
    print(f"{args.service}: {len(replayed)} message(s) handed back to be handled")
    left = [message_id for message_id in args.message_ids if message_id not in replayed]
    for message_id in left:
        print(f"{message_id}: not replayed (not parked, unknown, or never parsed)",
              file=sys.stderr)
    return 1 if left else 0


if __name__ == "__main__":
    sys.exit(main())
