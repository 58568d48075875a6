"""Where a JSON body gives a name more than once (shared.jsonio.loads_strict_naming_repeats): its
paths, first met first, a few at most, found without a path for each item the body holds."""

from __future__ import annotations

import json
import sys
import tracemalloc

import pytest

import shared.jsonio
from shared.jsonio import (
    PATH_NAMED_AT_MOST,
    REPEATS_NAMED_AT_MOST,
    REPEATS_TRIED_AT_MOST,
    loads_strict_naming_repeats,
)

BODY_LIMIT = 64 * 1024  # (the apps' MAX_CONTENT_LENGTH)


def _repeats_and_peak_memory(text: str) -> tuple[list[str], int]:
    """The repeats loads_strict_naming_repeats names in `text`, and the most memory it held above
    what was held as it began (under `python -X tracemalloc`, tracing already on, and left on)."""
    tracing_already = tracemalloc.is_tracing()
    if not tracing_already:
        tracemalloc.start()
    try:
        tracemalloc.reset_peak()
        before = tracemalloc.get_traced_memory()[0]
        _, repeated = loads_strict_naming_repeats(text)
        return repeated, tracemalloc.get_traced_memory()[1] - before
    finally:
        if not tracing_already:
            tracemalloc.stop()


def _repeats_and_steps(text: str) -> tuple[list[str], int]:
    """The repeats loads_strict_naming_repeats names in `text`, and how many lines of
    shared.jsonio's Python it ran for them (steps, where a time would be the machine's)."""
    steps = 0

    def count_lines(_frame, event, _arg):
        nonlocal steps
        steps += event == "line"
        return count_lines

    def in_jsonio(frame, _event, _arg):
        return count_lines if frame.f_code.co_filename == shared.jsonio.__file__ else None

    tracing = sys.gettrace()
    sys.settrace(in_jsonio)
    try:
        _, repeated = loads_strict_naming_repeats(text)
    finally:
        sys.settrace(tracing)
    return repeated, steps


def test_each_repeated_name_is_named_at_its_path_depth_first():
    text = ('{"x": {"c": 1, "c": 2}, "a": 1, "a": 2,'
            ' "l": [{"d": 1, "d": 2}, 3, [{"e": 1, "e": 2}]]}')
    value, repeated = loads_strict_naming_repeats(text)
    assert value == json.loads(text)
    assert repeated == ["a", "x.c", "l.0.d", "l.2.0.e"]
    assert loads_strict_naming_repeats('{"a": 1, "b": [1, {"c": 2}]}')[1] == []


def test_a_body_repeating_names_in_thousands_of_objects_names_the_first_few():
    item = '{"a": 1, "a": 1}'
    text = '{"k": [' + ",".join([item] * ((BODY_LIMIT - 10) // (len(item) + 1))) + "]}"
    assert len(text) <= BODY_LIMIT
    _, repeated = loads_strict_naming_repeats(text)
    assert repeated == [f"k.{index}.a" for index in range(REPEATS_NAMED_AT_MOST)]


def test_a_long_name_over_many_items_costs_no_path_for_each_item():
    """A name of 32,000 characters over 16,000 numbers: a path made for each item took some
    500 MB for one body of 64 KiB."""
    name = "k" * 32_000
    text = '{"username": "a", "username": "b", "' + name + '": [' + ",".join(["0"] * 16_000) + "]}"
    assert len(text) <= BODY_LIMIT
    repeated, peak = _repeats_and_peak_memory(text)
    assert repeated == ["username"]
    assert peak < 8 * 1024 * 1024, peak


def test_one_object_repeating_thousands_of_names_under_a_long_name_names_a_few_shortly():
    """2,600 names each given twice in an object under a name of 20,000 characters: a path was
    made for each (58 MB), and each named was 20,000 characters long."""
    pairs = ",".join(f'"{index}":0,"{index}":0' for index in range(2_600))
    text = '{"' + "k" * 20_000 + '": {' + pairs + "}}"
    assert len(text) <= BODY_LIMIT
    repeated, peak = _repeats_and_peak_memory(text)
    assert repeated == ["…" + ("k" * 20_000 + f".{index}")[1 - PATH_NAMED_AT_MOST:]
                        for index in range(REPEATS_NAMED_AT_MOST)]
    assert all(len(path) == PATH_NAMED_AT_MOST for path in repeated)
    assert peak < 8 * 1024 * 1024, peak


def test_a_path_met_again_is_named_once_and_counted_once():
    """A name given three times, `a.b` repeated beside a repeated `b` in `a`, two long paths
    whose last characters are the same: each named once, and the first REPEATS_NAMED_AT_MOST
    named are as many paths (the same path took two of them)."""
    assert loads_strict_naming_repeats('{"a": 1, "a": 2, "a": 3}')[1] == ["a"]
    assert loads_strict_naming_repeats(
        '{"a.b": 1, "a.b": 2, "a": {"b": 1, "b": 2, "b": 3}}')[1] == ["a.b"]
    long = "k" * PATH_NAMED_AT_MOST
    assert loads_strict_naming_repeats(
        f'{{"x{long}": 1, "x{long}": 1, "y{long}": 1, "y{long}": 1}}')[1] == ["…" + long[1:]]
    names = ",".join(f'"n{index}": 1, "n{index}": 1' for index in range(REPEATS_NAMED_AT_MOST))
    text = '{"l": [{"a.b": 1, "a.b": 1, "a": {"b": 1, "b": 1}}, {' + names + "}]}"
    assert loads_strict_naming_repeats(text)[1] == ["l.0.a.b"] + [
        f"l.1.n{index}" for index in range(REPEATS_NAMED_AT_MOST - 1)]


def test_repeats_in_a_repeated_names_earlier_value_are_passed_over_and_those_after_named():
    """A repeated name's earlier value is not in the value json.loads keeps (the last), and the
    walk goes through that value alone: an object repeating a name in an earlier value, however
    deep in others, is neither named nor counted toward the REPEATS_NAMED_AT_MOST, and the
    repeats after it are named."""
    for text, named in (
            ('{"x": {"a": 1, "a": 2}, "x": [{"b": 1, "b": 1}], "y": [{"c": 1, "c": 1}]}',
             ["x", "x.0.b", "y.0.c"]),
            ('{"x": [{"y": {"a": 1, "a": 1}, "y": [{"b": 1, "b": 1}]}], "x": 0,'
             ' "z": [[], [0], {"c": 1, "c": 1}]}', ["x", "z.2.c"]),
            ('[{"x": {"a": 1, "a": 1}, "x": {"a": 1, "a": 1}}, {"a": 1, "a": 1}]',
             ["0.x", "0.x.a", "1.a"])):
        assert loads_strict_naming_repeats(text)[1] == named, text


# Chains of objects nested 800 deep (the parser reads some 1,000, Python's recursion limit), each
# object below the first 600 giving a name twice: cut to its last PATH_NAMED_AT_MOST characters,
# every such path is the same (the one given).
DEEP_CHAINS = {
    "names of a character": ('{"k":' * 600 + '{"x":1,"x":1,"k":' * 200 + "0" + "}" * 800,
                             "…" + ("k." * PATH_NAMED_AT_MOST + "x")[1 - PATH_NAMED_AT_MOST:]),
    "empty names": ('{"":' * 600 + '{"x":1,"x":1,"":' * 200 + "0" + "}" * 800,
                    "…" + "." * (PATH_NAMED_AT_MOST - 2) + "x"),
}


@pytest.mark.parametrize(("text", "path"), DEEP_CHAINS.values(), ids=DEEP_CHAINS)
def test_a_deep_chain_of_objects_repeating_one_path_costs_no_walk_to_the_top_for_each(text, path):
    """Each object's path was made whole, up through all its parents, to be found the same as
    the last: the chain's depth squared, some 440,000 steps here (16 KiB of such a chain 1,000
    deep took 50 ms of a core). Now a path's end is made from no more parents than give its last
    characters, and no more than REPEATS_TRIED_AT_MOST repeated names are tried: 60,000 to
    100,000 steps."""
    repeated, steps = _repeats_and_steps(text)
    assert repeated == [path]
    assert steps < 150_000, steps


def test_no_more_repeated_names_are_tried_than_a_hundred():
    """After REPEATS_TRIED_AT_MOST names tried, a path met again each time, the walk stops: a
    repeat further on is not named (the body is refused for those named)."""

    def chain(repeating_x: int) -> str:
        return ('{"":' * 300 + '{"x":1,"x":1,"":' * repeating_x + '{"y":1,"y":1}'
                + "}" * (300 + repeating_x))

    dots = "…" + "." * (PATH_NAMED_AT_MOST - 2)
    assert loads_strict_naming_repeats(chain(REPEATS_TRIED_AT_MOST))[1] == [dots + "x"]
    assert loads_strict_naming_repeats(chain(REPEATS_TRIED_AT_MOST - 1))[1] == [
        dots + "x", dots + "y"]
