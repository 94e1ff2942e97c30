-- Make the open database a primary and commit two transactions; prints key=value lines.
-- Run in the sqlite3 shell AFTER `.load build/libreplica` and `.open <db>` (in that order):
--   sqlite3 -bail -cmd '.load build/libreplica' -cmd '.open app.db' < sql/primary_basic.sql
-- Used by tests/python/test_functions.py::test_cli_primary_script.
.headers off
.mode list
SELECT 'role_before=' || ifnull(repl_role(), 'NULL');
SELECT 'lsn_start=' || repl_primary();
SELECT 'role=' || repl_role();
SELECT 'journal_mode=' || journal_mode FROM pragma_journal_mode;
CREATE TABLE t(x);
INSERT INTO t VALUES (1);
SELECT 'lsn_after=' || repl_lsn();
SELECT 'checksum=' || repl_checksum();
