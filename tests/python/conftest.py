"""Fixtures for the Python tests; the helpers themselves (and how the extension is loaded, and
why) are in helpers.py: ``from helpers import apsw_conn, sqlite3_cli, run_py, wait_for``.
"""

from __future__ import annotations

import os
from pathlib import Path

# The tests read the extension's info-level event lines (bootstrap, resnapshot, gap …) from
# the stderr of the processes they start; users get warnings and errors only by default.
os.environ.setdefault("REPL_LOG", "info")

import pytest

from helpers import require_extension, load_in_process
from killshim import build_kill_shim


@pytest.fixture(scope="session")
def ext_path() -> str:
    """Absolute path of build/libreplica (no ``.so``; SQLite appends it)."""
    return require_extension()


@pytest.fixture
def tmp(tmp_path: Path) -> Path:
    """A fresh, empty directory for this test's databases."""
    return tmp_path


@pytest.fixture
def loaded(ext_path: str) -> str:
    """The extension is loaded into this (pytest) process."""
    load_in_process()
    return ext_path


@pytest.fixture(scope="session")
def kill_shim(tmp_path_factory) -> str:
    """Path of the compiled LD_PRELOAD kill shim (killshim.py); skips without a C compiler."""
    so = build_kill_shim(tmp_path_factory.mktemp("killshim"))
    if so is None:
        pytest.skip("no C compiler for the LD_PRELOAD kill shim")
    return so
