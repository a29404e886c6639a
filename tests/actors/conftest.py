"""Fixtures of the actor tests: `overlap` runs a test with step overlap on and off."""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from fakes import set_overlap_default


@pytest.fixture(params=[False, True], ids=["lockstep", "overlap"])
def overlap(request: pytest.FixtureRequest) -> Iterator[bool]:
    with pytest.MonkeyPatch.context() as patch:
        set_overlap_default(patch, request.param)
        yield request.param
