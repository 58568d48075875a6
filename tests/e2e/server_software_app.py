"""A WSGI app that answers with the server software its request's environ names and its worker's
process environment does (SERVER_SOFTWARE in each, null where the key is missing), for a test to
serve under gunicorn as the shop's APIs are served (test_unreadable_requests.py): the shop's apps
answer with nothing of either."""

from __future__ import annotations

import json
import os


def answer_the_server_software(environ, start_response):
    body = json.dumps({"environ": environ.get("SERVER_SOFTWARE"),
                       "process": os.environ.get("SERVER_SOFTWARE")}).encode()
    start_response("200 OK", [("Content-Type", "application/json"),
                              ("Content-Length", str(len(body)))])
    return [body]
