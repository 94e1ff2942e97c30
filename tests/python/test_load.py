"""Loading the extension from real hosts, and the function list against docs/SQL.md.

- the sqlite3 CLI (Debian's 3.40.1) and apsw (its own bundled SQLite) both load build/libreplica;
- after one load, NEW connections get the functions (auto-extension) and the `replica` VFS is
  the process default;
- the set of `repl_*` functions equals the set documented in docs/SQL.md, and every function
  is called by at least one test under tests/.
"""

from __future__ import annotations

import json
import re
import tomllib

import apsw

from helpers import FUNCTIONS, REPO, apsw_conn, cli_ok, extension_path, one, py_ok, sqlite3_cli

# `_` is a LIKE wildcard ('repl_%' also matches 'replace'), so compare the prefix instead.
REPL_FUNCTIONS_SQL = "SELECT DISTINCT name FROM pragma_function_list WHERE substr(name, 1, 5) = 'repl_'"


def crate_version() -> str:
    with open(REPO / "Cargo.toml", "rb") as f:
        return tomllib.load(f)["package"]["version"]


def documented_functions() -> list[str]:
    """Names from the `## repl_xxx(...)` headings of docs/SQL.md, in order."""
    text = (REPO / "docs" / "SQL.md").read_text()
    return re.findall(r"^## (repl_\w+)\(", text, flags=re.MULTILINE)


def test_cli_loads_and_reports_version():
    out = cli_ok(None, "SELECT repl_version();")
    assert out.strip() == crate_version()


def test_cli_load_twice_is_harmless():
    out = cli_ok(None, f".load {extension_path()}\nSELECT repl_version();")
    assert out.strip() == crate_version()


def test_cli_without_load_has_no_functions():
    proc = sqlite3_cli(None, "SELECT repl_version();", load=False)
    assert proc.returncode != 0
    assert "no such function: repl_version" in proc.stderr


def test_apsw_loads(tmp):
    conn = apsw_conn(tmp / "a.db")
    assert one(conn, "SELECT repl_version()") == crate_version()
    assert "replica" in apsw.vfs_names()


def test_apsw_loads_with_explicit_so_suffix_and_entry_point(ext_path):
    conn = apsw.Connection(":memory:")
    conn.enable_load_extension(True)
    conn.load_extension(ext_path + ".so", "sqlite3_replica_init")
    assert one(conn, "SELECT repl_version()") == crate_version()


def test_new_connection_gets_functions_and_default_vfs(tmp):
    """In a fresh process: load once through one connection, then open another WITHOUT
    enabling extension loading; it has every function and opens through the `replica` VFS."""
    out = py_ok(
        f"""
        load()
        conn = apsw.Connection({str(tmp / "new.db")!r})
        names = sorted(r[0] for r in conn.execute({REPL_FUNCTIONS_SQL!r}))
        print(json.dumps({{"names": names, "vfs": apsw.vfs_names(),
                           "version": one(conn, "SELECT repl_version()")}}))
        """
    )
    got = json.loads(out)
    assert set(FUNCTIONS) <= set(got["names"]), got["names"]
    assert got["vfs"][0] == "replica", f"default VFS is {got['vfs'][0]}, expected replica"
    assert got["version"] == crate_version()


def test_vfs_uri_parameter(tmp, loaded):
    conn = apsw.Connection(f"file:{tmp / 'uri.db'}?vfs=replica", flags=apsw.SQLITE_OPEN_URI
                           | apsw.SQLITE_OPEN_READWRITE | apsw.SQLITE_OPEN_CREATE)
    conn.execute("CREATE TABLE t(x); INSERT INTO t VALUES (42)")
    assert one(conn, "SELECT x FROM t") == 42
    assert one(conn, "SELECT repl_role()") is None


def test_functions_documented(loaded):
    """pragma_function_list and docs/SQL.md name the same repl_* functions."""
    documented = documented_functions()
    assert len(documented) == len(set(documented)), f"duplicate headings in docs/SQL.md: {documented}"
    assert set(FUNCTIONS) <= set(documented), f"missing from docs/SQL.md: {set(FUNCTIONS) - set(documented)}"
    conn = apsw.Connection(":memory:")
    registered = {r[0] for r in conn.execute(REPL_FUNCTIONS_SQL)}
    assert registered == set(documented), (
        f"registered but undocumented: {sorted(registered - set(documented))}; "
        f"documented but not registered: {sorted(set(documented) - registered)}"
    )


def test_every_function_has_a_test():
    """Every documented function is called (`name(`) somewhere under tests/ (Python or Rust)."""
    sources = [
        p.read_text(errors="replace")
        for p in (REPO / "tests").rglob("*")
        if p.is_file() and p.suffix in {".py", ".rs", ".sql", ".sh"} and "__pycache__" not in p.parts
    ]
    untested = [
        name
        for name in documented_functions()
        if not any(re.search(rf"\b{name}\s*\(", src) for src in sources)
    ]
    assert not untested, f"functions without a test under tests/: {untested}"
