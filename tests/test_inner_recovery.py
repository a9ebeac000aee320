"""``_inner_recovery``: what an outer (middleware) attempt counts as already given up on.

The middleware tests drive the rule end to end; these pin its edges: groups, chains, marks
that must not match, an application exception whose attributes raise, and nesting.
"""

from __future__ import annotations

import sys
from typing import Any

import pytest

from otel_recovery._inner_recovery import OuterAttempt, note_decided, outer_attempt


class Response:
    """Stands in for a client's response object (identity is what matters)."""


class StatusError(Exception):
    def __init__(self, response: Any) -> None:
        super().__init__("503")
        self.response = response


class Hostile(ConnectionError):
    @property
    def response(self) -> Any:
        raise RuntimeError("no response attached")


def gave_up_on(*errors: BaseException) -> OuterAttempt:
    with outer_attempt() as attempt:
        for error in errors:
            note_decided(error)
    return attempt


def test_the_error_itself_one_raised_from_it_and_one_for_its_response_are_decided():
    given_up = StatusError(Response())
    attempt = gave_up_on(given_up)
    assert attempt.decided(given_up)
    try:
        raise RuntimeError("wrapped") from given_up
    except RuntimeError as wrapped:
        assert attempt.decided(wrapped)
    assert attempt.decided(StatusError(given_up.response))  # raise_for_status() on it
    assert not attempt.decided(StatusError(Response()))
    assert not attempt.decided(ConnectionError("unrelated"))


def test_values_shared_by_value_are_never_marks():
    """An exception class with ``response = ""`` (or a number) must not make every other
    such exception look given up on."""
    given_up = StatusError("")
    attempt = gave_up_on(given_up)
    assert not attempt.decided(StatusError(""))
    assert not gave_up_on(StatusError(0)).decided(StatusError(0))


def test_an_application_exception_whose_attributes_raise_is_left_alone():
    """Reading ``.response`` of the app's exception must not replace that exception."""
    hostile = Hostile("reset")
    attempt = gave_up_on(hostile)
    assert attempt.decided(hostile)
    assert not attempt.decided(Hostile("another"))


@pytest.mark.skipif(sys.version_info < (3, 11), reason="ExceptionGroup is built in from 3.11")
def test_a_group_is_decided_when_every_member_is():
    first, second = ConnectionError("a"), ConnectionError("b")
    attempt = gave_up_on(first, second)
    group = ExceptionGroup("task group", [first, second])  # noqa: F821 (3.11+)
    assert attempt.decided(group)
    mixed = ExceptionGroup("task group", [first, ConnectionError("c")])  # noqa: F821
    assert not attempt.decided(mixed)


def test_an_inner_attempt_passes_its_give_ups_to_the_enclosing_one():
    given_up = ConnectionError("down")
    with outer_attempt() as outer:
        with outer_attempt() as inner:
            note_decided(given_up)
        assert inner.decided(given_up)
    assert outer.decided(given_up)
    note_decided(given_up)  # outside any attempt: nothing to mark, nothing raised


def test_what_is_remembered_is_bounded():
    attempt = gave_up_on(*(ConnectionError(str(n)) for n in range(500)))
    assert len(attempt._given_up) == 64
