"""JSON for the HTTP APIs: numbers are read as `Decimal` (never float), NaN and Infinity are
refused, and Decimals, UUIDs and datetimes are written in their wire forms."""

from __future__ import annotations

import json
import sys
from collections.abc import Callable
from decimal import Decimal
from typing import Any

from flask.json.provider import DefaultJSONProvider


def _refuse_constant(name: str):
    raise json.JSONDecodeError(f"{name} is not a valid JSON number", name, 0)


class NumberBeyondDecimal:
    """A JSON number whose exponent is past what a Decimal holds (1e1000000000000000000: past
    10**18 either way), kept as the text it was sent as. Valid JSON: a request body holding one
    is read, and the field it is given for refuses it with its own reason (an amount: too large,
    or too many decimals), where the whole body was called no JSON."""

    __slots__ = ("text",)

    def __init__(self, text: str):
        self.text = text

    def __repr__(self) -> str:
        return f"NumberBeyondDecimal({self.text[:40]!r})"


def _decimal_or_beyond(text: str) -> Decimal | NumberBeyondDecimal:
    try:
        return Decimal(text)
    except ArithmeticError:
        return NumberBeyondDecimal(text)


def _integer_of_any_length(text: str) -> int | Decimal:
    """An int; past the digits Python reads into one (its int max-str-digits, 4300, a guard
    against int()'s quadratic time), the Decimal it is, read in linear time: exact either way."""
    limit = sys.get_int_max_str_digits()
    return int(text) if not limit or len(text.lstrip("-")) <= limit else Decimal(text)


def loads_strict(text: str | bytes, object_pairs_hook: Callable[[list], Any] | None = None, *,
                 any_number: bool = False):
    """Parse JSON with numbers as Decimal; NaN, Infinity and whatever else cannot be read (nesting
    deeper than Python recurses, an integer longer than it converts, an exponent beyond Decimal's
    range) raise JSONDecodeError (a 400 from the APIs, for a body nested too deep).
    `object_pairs_hook`: as json.loads takes it. `any_number`: every number is read, as it is
    valid JSON: an integer past 4300 digits as a Decimal, one with an exponent past Decimal's
    range as a NumberBeyondDecimal (a request body's: the field given one says what is wrong with
    it; a record's or a row's numbers stay bounded)."""
    numbers = ({"parse_float": _decimal_or_beyond, "parse_int": _integer_of_any_length}
               if any_number else {"parse_float": Decimal})
    try:
        return json.loads(text, parse_constant=_refuse_constant,
                          object_pairs_hook=object_pairs_hook, **numbers)
    except json.JSONDecodeError:
        raise
    except (RecursionError, ValueError, ArithmeticError) as exc:
        # With the document itself: webargs reads an error on an empty document as "no body".
        doc = text if isinstance(text, str) else text.decode("utf-8", "replace")
        raise json.JSONDecodeError(f"unreadable JSON ({type(exc).__name__})", doc, 0) from None


# Where a name is given more than once, at most so many of them are named (the first met): a body
# of 64 KiB can repeat names in thousands of objects, and the answer naming each was 1,000 times
# its size.
REPEATS_NAMED_AT_MOST = 10
# And a path is named by its last so many characters at most (a name can be 64 KiB long).
PATH_NAMED_AT_MOST = 200
# And they are of the first so many repeated names met (a path met again, not named, counts too):
# in a deep chain of objects each repeating a name, every path cut to its last characters is the
# same, and each was tried, its path made through some 1,000 parents (16 KiB: 50 ms of a core).
REPEATS_TRIED_AT_MOST = 100


def loads_strict_naming_repeats(text: str | bytes) -> tuple[Any, list[str]]:
    """loads_strict's value, and where an object in it gives a name more than once: each such
    name's path, its names and list indexes joined by dots (`"amount"` at the top, `"description.
    amount"` in the object that is the description, `"0.a"` in an array's first), depth first,
    each object's repeated names before what it holds, REPEATS_NAMED_AT_MOST of them at most, each
    by its last PATH_NAMED_AT_MOST characters at most ("…" before them), and each once (a path
    met again, `a.b` repeated beside a repeated `b` in `a`, is neither named nor counted again),
    of the first REPEATS_TRIED_AT_MOST repeated names met. The value holds the last value of each,
    as json.loads keeps it. A request body's reader: every number in it is read (`any_number`)."""
    repeating: list[tuple[dict, list[str]]] = []  # each object that repeats a name, and which

    def each_name_once(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
        taken = dict(pairs)
        if len(taken) < len(pairs):
            seen: set[str] = set()
            repeated: dict[str, None] = {}
            for name, _value in pairs:
                if name in seen:
                    repeated.setdefault(name)
                seen.add(name)
            repeating.append((taken, list(repeated)))
        return taken

    value = loads_strict(text, object_pairs_hook=each_name_once, any_number=True)
    return value, (_paths_of_repeats(value, repeating) if repeating else [])


def _paths_of_repeats(value: Any, repeating: list[tuple[dict, list[str]]]) -> list[str]:
    """The paths in `value` of the names repeated in each of `repeating`'s objects (one the value
    no longer holds, a repeated name's earlier value, is passed over: its name is repeated), the
    first REPEATS_NAMED_AT_MOST met, each once, of the first REPEATS_TRIED_AT_MOST names met."""
    repeated_in = {id(taken): names for taken, names in repeating}  # (`repeating` keeps each)
    paths: list[str] = []
    named: set[str] = set()
    tried = 0
    for item, place in _places_of(value, repeated_in):
        at = _end_of_path(place)
        for name in repeated_in[id(item)]:
            path = _shortened(at, name)
            if path not in named:
                named.add(path)
                paths.append(path)
                if len(paths) == REPEATS_NAMED_AT_MOST:
                    return paths
            tried += 1
            if tried == REPEATS_TRIED_AT_MOST:
                return paths
    return paths


_CONTAINERS = (dict, list)
_CONTAINER_TYPES = frozenset(_CONTAINERS)


def _places_of(value: Any, wanted: dict[int, Any]):
    """Each object in `value` whose id is one of `wanted`'s, depth first (`value` itself first),
    with its place: a link to its parent's (its parent's place and its key in the parent, None at
    the top), not a path (a path for each item held the body's size squared). Walked with a
    stack of its own, not recursively (the value can be as deep as Python recurses), and only
    into what can hold one: never into a scalar, nor into an array or an object (not wanted)
    that holds nothing but scalars and empty arrays and objects. (A body of 64 KiB holds some
    21,000 empty arrays: each was walked into, some 15 ms of a core where there was a repeat.)"""
    stack: list[tuple[Any, tuple | None, Any]] = [(value, None, None)]
    while stack:
        item, parent, key = stack.pop()
        place = None if parent is None and key is None else (parent, key)
        if item.__class__ is dict:
            if id(item) in wanted:
                yield item, place
            children = item.items()
        else:
            children = enumerate(item)
        children = [(child, place, child_key) for child_key, child in children
                    if child.__class__ in _CONTAINERS and child
                    and (id(child) in wanted or _holds_containers(child))]
        children.reverse()
        stack += children


def _holds_containers(container: dict | list) -> bool:
    """Whether `container` holds a non-empty object or array (looked for at C's speed)."""
    items = container.values() if container.__class__ is dict else container
    return not _CONTAINER_TYPES.isdisjoint(map(type, filter(None, items)))


def _shortened(at: str, name: str) -> str:
    """The path `at` + `name`, by its last PATH_NAMED_AT_MOST characters at most ("…" first),
    made without joining a long `at` to each name; `at` may be _end_of_path's, a longer one's
    last PATH_NAMED_AT_MOST + 1 characters (all that is read of it here)."""
    if len(at) + len(name) <= PATH_NAMED_AT_MOST:
        return at + name
    if len(name) >= PATH_NAMED_AT_MOST - 1:
        return "…" + name[1 - PATH_NAMED_AT_MOST:]
    return "…" + at[len(name) + 1 - PATH_NAMED_AT_MOST:] + name


def _end_of_path(place: tuple | None) -> str:
    """The path, names and indexes each followed by a dot, of an item at `place` (its parent's
    place and its key in the parent, None at the top), by its last PATH_NAMED_AT_MOST + 1
    characters at most: its parents are looked up only until they give so many, not to the top
    (a path made whole for each of a deep chain's objects cost the chain's depth squared)."""
    keys: list[str] = []
    length = 0  # (of the keys gathered, with their dots)
    while place is not None and length <= PATH_NAMED_AT_MOST:
        place, key = place
        keys.append(key := str(key)[-PATH_NAMED_AT_MOST - 1:])  # (a name can be 64 KiB long)
        length += len(key) + 1
    keys.reverse()
    keys.append("")
    return ".".join(keys)[-PATH_NAMED_AT_MOST - 1:]


def dumps_exact(value: Any) -> str:
    """JSON text for `value`, its Decimals written as the numbers they are (as loads_strict reads
    them back; json.dumps refuses them): a stored message's payload, say, read back with the
    numbers it was sent with."""
    if isinstance(value, Decimal):
        return str(value)  # "10.50", "1E+1000", "-0": JSON numbers, and as long as they were sent
    if isinstance(value, dict):
        return "{" + ",".join(f"{json.dumps(str(key), ensure_ascii=False)}:{dumps_exact(item)}"
                              for key, item in value.items()) + "}"
    if isinstance(value, (list, tuple)):
        return "[" + ",".join(dumps_exact(item) for item in value) + "]"
    return json.dumps(value, ensure_ascii=False)


class StrictDecimalJSONProvider(DefaultJSONProvider):
    sort_keys = False

    def loads(self, s, **kwargs):
        if kwargs:
            return json.loads(s, **kwargs)
        return loads_strict(s)

    @staticmethod
    def default(o):
        if isinstance(o, Decimal):
            return str(o)
        return DefaultJSONProvider.default(o)
