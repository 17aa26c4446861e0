"""Fixtures the CLI tests share."""

import pytest

from search.space import load_space
from search.storage import study as st


@pytest.fixture()
def existing(results, storage):
    """A results folder whose storage holds one study, ``smoke``; returns the db path."""
    st.open_study(st.open_storage(storage, create=True), "smoke", load_space("smoke"))
    return results / "diffnas.db"
