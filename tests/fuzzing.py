"""Hypothesis settings and strategies shared by the fuzz/property tests.

Runs are bounded and reproducible: ``derandomize=True`` draws the same examples on every
machine (a CI failure replays locally), no example database is written, and each property
runs its own modest number of examples. ``LAYERVAULT_FUZZ_EXAMPLES=N`` runs N examples per
property instead, for a longer hunt on a developer's machine.
"""

from __future__ import annotations

import os

from hypothesis import HealthCheck, settings
from hypothesis import strategies as st

FUZZ_EXAMPLES_ENV = "LAYERVAULT_FUZZ_EXAMPLES"


def fuzz_settings(default_examples: int) -> settings:
    """Settings for one property: ``default_examples`` unless the environment asks for more."""
    wanted = os.environ.get(FUZZ_EXAMPLES_ENV)
    return settings(
        max_examples=int(wanted) if wanted else default_examples,
        deadline=None,
        derandomize=True,
        database=None,
        print_blob=False,
        # Servers and stores are shared by all examples on purpose: starting them per example
        # would cost far more than the examples themselves.
        suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow,
                               HealthCheck.data_too_large, HealthCheck.large_base_example],
    )


#: Pieces that have broken path handling somewhere: separators, traversal, escapes that
#: decode to them, control characters, the local store's temporary-file prefix, our own
#: hash marker.
NASTY_FRAGMENTS = ["/", "//", ".", "..", "../", "/..", "\\", "%2e", "%2E%2E", "%2f", "%", "~", "\x00", "\n", "\r",
                   "\t", "\x7f", "\x1b", " ", ".tmp-", "\u202e", "\ufeff", "\U0010ffff", "層", "é", "e\u0301"]

#: Any Unicode code point except lone surrogates (which no protobuf string can carry).
any_char = st.characters(exclude_categories=("Cs",))


def hostile_text(min_size: int = 0, max_size: int = 40) -> st.SearchStrategy[str]:
    """Strings made of arbitrary code points mixed with :data:`NASTY_FRAGMENTS`."""
    piece = st.one_of(st.sampled_from(NASTY_FRAGMENTS), st.text(any_char, min_size=1, max_size=8))
    return st.lists(piece, min_size=min_size, max_size=max_size).map("".join)


def long_text() -> st.SearchStrategy[str]:
    """Names far beyond one key segment: a repeated unit, so generating them stays cheap."""
    return st.builds(lambda unit, times, tail: unit * times + tail,
                     st.text(any_char, min_size=1, max_size=4), st.integers(60, 1200), hostile_text(max_size=4))


def layer_names() -> st.SearchStrategy[str]:
    return st.one_of(hostile_text(min_size=1), long_text(), st.text(any_char, min_size=1, max_size=300))
