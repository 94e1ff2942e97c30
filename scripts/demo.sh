#!/usr/bin/env bash
# `make demo`: a primary and a replica on this machine, each in its own sqlite3 process, the
# replica pulling from the primary's log directory. Shows a write reaching the replica (LSNs and
# checksums equal), a stock sqlite3 (no extension) reading the replica, and a write on the
# replica being refused. Everything happens in a temporary directory that is removed at the end.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
EXT="$PWD/build/libreplica"
SQLITE3="${REPLICA_SQLITE3:-sqlite3}"
[ -e "$EXT.so" ] || { echo "demo: $EXT.so is missing: run 'make build' first" >&2; exit 1; }
command -v "$SQLITE3" >/dev/null || { echo "demo: no sqlite3 shell on PATH (make deps installs it)" >&2; exit 1; }

DIR="$(mktemp -d "${TMPDIR:-/tmp}/replica-demo.XXXXXX")"
trap 'rm -rf "$DIR"' EXIT
PRIMARY="$DIR/primary.db"
REPLICA="$DIR/replica.db"
LOGS="$DIR/events.log"

step() { printf '\n\033[1m== %s\033[0m\n' "$*"; }
# run NAME SQL: one sqlite3 process with the extension loaded; output indented, event lines
# (the extension's key=value log on stderr) collected in $LOGS.
run() {
  local name="$1" db="$2" sql="$3"
  printf '%s\n' "$sql" | sed "s/^/  $name sql> /"
  { printf '.load %s\n.open %s\n.headers off\n.mode list\n' "$EXT" "$db"; printf '%s\n' "$sql"; } \
    | "$SQLITE3" -batch -bail 2>>"$LOGS" | sed "s/^/  $name    | /"
}

echo "sqlite-replica demo in $DIR ($("$SQLITE3" -version | cut -d' ' -f1), extension $EXT.so)"

step "process 1 (primary): make app.db a primary and write"
run primary "$PRIMARY" "SELECT 'lsn after repl_primary: ' || repl_primary();
CREATE TABLE greetings(id INTEGER PRIMARY KEY, text TEXT NOT NULL);
INSERT INTO greetings(text) VALUES ('hello from the primary');
SELECT 'primary lsn=' || repl_lsn() || ' checksum=' || repl_checksum();"

step "process 2 (replica): bootstrap a new file from the primary and read"
run replica "$REPLICA" "SELECT 'replica synced to lsn ' || repl_sync('$PRIMARY');
SELECT id, text FROM greetings;
SELECT 'replica lsn=' || repl_lsn() || ' checksum=' || repl_checksum();"

step "process 3 (primary again): another write"
run primary "$PRIMARY" "INSERT INTO greetings(text) VALUES ('a second write, '|| datetime('now'));
SELECT 'primary lsn=' || repl_lsn() || ' checksum=' || repl_checksum();"
P_LINE="$(printf '.load %s\n.open %s\nSELECT repl_lsn() || %s || repl_checksum();\n' "$EXT" "$PRIMARY" "' '" | "$SQLITE3" -batch 2>>"$LOGS")"

step "process 4 (replica again): pull (source remembered) and read"
run replica "$REPLICA" "SELECT 'replica synced to lsn ' || repl_sync();
SELECT id, text FROM greetings;
SELECT 'replica lsn=' || repl_lsn() || ' checksum=' || repl_checksum();"
R_LINE="$(printf '.load %s\n.open %s\nSELECT repl_lsn() || %s || repl_checksum();\n' "$EXT" "$REPLICA" "' '" | "$SQLITE3" -batch 2>>"$LOGS")"

step "process 5 (stock sqlite3, no extension): read the replica file directly"
printf '  stock    | %s\n' "$("$SQLITE3" -batch "$REPLICA" "SELECT count(*) || ' rows, integrity ' || (SELECT integrity_check FROM pragma_integrity_check) FROM greetings;")"

step "process 6 (replica): a write is refused"
set +e
OUT="$(printf '.load %s\n.open %s\nINSERT INTO greetings(text) VALUES (%s);\n' "$EXT" "$REPLICA" "'not allowed'" | "$SQLITE3" -batch 2>&1 | grep -v 'event=')"
set -e
printf '  replica sql> INSERT INTO greetings(text) VALUES (...);\n  replica    | %s\n' "$OUT"

step "result"
echo "  primary: lsn checksum = $P_LINE"
echo "  replica: lsn checksum = $R_LINE"
if [ "$P_LINE" != "$R_LINE" ] || [ -z "$P_LINE" ]; then
  echo "demo: FAILED: the replica does not equal the primary" >&2
  exit 1
fi
case "$OUT" in
  *readonly*) ;;
  *) echo "demo: FAILED: the write on the replica was not refused: $OUT" >&2; exit 1 ;;
esac
echo "  the replica equals the primary at the same LSN (byte-identical content, same checksum),"
echo "  and refuses writes with SQLITE_READONLY."
echo
echo "extension events (key=value, one line per event):"
sed 's/^/  /' "$LOGS"
