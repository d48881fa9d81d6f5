"""Hypothesis: no input crashes parse_config; every failure is a ConfigError."""

from __future__ import annotations

import tomllib
from typing import Any

from hypothesis import given, settings
from hypothesis import strategies as st

from keyd.config import Config, parse_config
from keyd.errors import ConfigError

KEYS = ["volume", "trust", "layer", "kind", "type", "below", "device", "uuid", "degraded",
        "cipher", "key_size", "hash", "offset", "mountpoint", "fstype", "image", "options",
        "signers", "gnupghome", "services", "key", "key_format", "pim", "tank", "md0", "c",
        "raid", "crypt", "mount", "loop", "plain", "luks", "tcrypt", "veracrypt", "zfs"]

scalars = st.one_of(st.sampled_from(KEYS), st.text(max_size=12), st.integers(-5, 5000),
                    st.booleans(), st.floats(allow_nan=False, allow_infinity=False),
                    st.just("/dev/sdb"), st.just("after=3"), st.just("/mnt/x"))
values: st.SearchStrategy[Any] = st.recursive(
    scalars,
    lambda inner: st.one_of(st.lists(inner, max_size=3),
                            st.dictionaries(st.sampled_from(KEYS), inner, max_size=5)),
    max_leaves=25)
documents = st.dictionaries(st.sampled_from(["volume", "trust"]), values, max_size=2)


def _toml_value(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int | float):
        return repr(value)
    if isinstance(value, str):
        return '"' + value.encode("unicode_escape").decode("ascii").replace('"', '\\"') + '"'
    if isinstance(value, list):
        return "[" + ", ".join(_toml_value(v) for v in value) + "]"
    return "{" + ", ".join(f'"{k}" = {_toml_value(v)}' for k, v in value.items()) + "}"


def _outcome(text: str) -> None:
    try:
        result = parse_config(text, "fuzz.toml")
    except ConfigError as error:
        assert error.file == "fuzz.toml" and error.problem
    else:
        assert isinstance(result, Config)


@settings(max_examples=300, deadline=None)
@given(st.text(max_size=300))
def test_arbitrary_text_never_crashes(text: str) -> None:
    _outcome(text)


@settings(max_examples=400, deadline=None)
@given(documents)
def test_arbitrary_toml_documents_never_crash(document: dict[str, Any]) -> None:
    text = "\n".join(f"{key} = {_toml_value(value)}" for key, value in document.items())
    try:
        tomllib.loads(text)
    except tomllib.TOMLDecodeError:
        return  # the generator made something TOML rejects; the text test covers that
    _outcome(text)


def test_deeply_nested_arrays_are_a_config_error_not_a_recursion_crash() -> None:
    _outcome("a = " + "[" * 5000 + "]" * 5000)
