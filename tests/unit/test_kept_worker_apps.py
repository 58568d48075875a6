"""tasks.services.kept_for_the_process tells a service's worker app, kept for the process, from any
other app (the tests close every app they build but those: tests/conftest.py)."""

from __future__ import annotations

from flask import Flask

from tasks import services


def test_only_a_kept_worker_app_is_kept_for_the_process(monkeypatch):
    kept, other = Flask("kept"), Flask("other")
    monkeypatch.setattr(services, "_apps", {"orders": kept})
    assert services.kept_for_the_process(kept)
    assert not services.kept_for_the_process(other)
