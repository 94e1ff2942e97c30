#!/usr/bin/env bash
# `make demo`: the main job, on this machine, over loopback HTTP. A primary process serves its
# replication log (repl_primary('127.0.0.1:0')); a replica process follows it (repl_follow) and
# each write on the primary is timed until it is visible on the replica; a stock sqlite3 (no
# extension) reads the replica file while it follows; a write forwarded from the replica
# (repl_exec) is read back at once; a local write on the replica is refused; both end at the
# same LSN with the same checksum. Exits non-zero with "demo: FAILED: ..." when a claim does
# not hold.
#
# The processes are driven by scripts/demo.py under Debian's /usr/bin/python3 (its stdlib
# sqlite3 module loads extensions; override with REPLICA_PYTHON, the shell with REPLICA_SQLITE3).
# Everything lives in a temporary directory; on exit, Ctrl-C or TERM the trap stops every
# process the demo started (each names that directory on its command line) and removes it.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
EXT="$PWD/build/libreplica"
SQLITE3="${REPLICA_SQLITE3:-sqlite3}"
PY="${REPLICA_PYTHON:-/usr/bin/python3}"
START_NS="$(date +%s%N)"

die() { echo "demo: $*" >&2; exit 1; }
[ -e "$EXT.so" ] || die "$EXT.so is missing: run 'make build' first (or 'make demo', which builds)"
command -v "$SQLITE3" >/dev/null || die "no sqlite3 shell '$SQLITE3' on PATH: 'make deps' installs it (apt-get install sqlite3)"
[ -x "$PY" ] || die "$PY is missing: 'make deps' installs it (apt-get install python3), or set REPLICA_PYTHON to a python3 whose sqlite3 module can load extensions"
"$PY" -c 'import sqlite3; sqlite3.connect(":memory:").enable_load_extension(True)' 2>/dev/null \
  || die "$PY's sqlite3 module cannot load extensions (built without --enable-loadable-sqlite-extensions): use Debian's /usr/bin/python3 or set REPLICA_PYTHON"

DIR= EVENTS= DRIVER=

if [ -t 1 ]; then BOLD=$'\033[1m' PLAIN=$'\033[0m'; else BOLD= PLAIN=; fi
step() { printf '\n%s== %s%s\n' "$BOLD" "$*" "$PLAIN"; }

# PIDS := the processes whose command line names $DIR: every process this demo started (the
# driver, the primary and replica processes, a stock sqlite3) and nothing else, since $DIR is new.
find_pids() {
  PIDS=()
  local f pid args
  for f in /proc/[0-9]*/cmdline; do
    pid="${f#/proc/}"; pid="${pid%/cmdline}"
    [ "$pid" != "$$" ] || continue
    args=()
    { mapfile -d '' -t args <"$f"; } 2>/dev/null || continue   # it may have exited meanwhile
    [[ "${args[*]-}" == *"$DIR"* ]] && PIDS+=("$pid")
  done
  return 0
}

cleanup() {
  local rc=$? deadline
  # Finish the clean-up even if another Ctrl-C or TERM arrives meanwhile (it is bounded: each
  # wait below has a deadline).
  trap - EXIT
  trap '' INT TERM
  set +e
  [ -n "$DIR" ] || exit "$rc"
  # The driver first: on TERM it stops its primary and replica processes itself.
  if [ -n "$DRIVER" ] && kill -0 "$DRIVER" 2>/dev/null; then kill -TERM "$DRIVER" 2>/dev/null; fi
  [ -z "$DRIVER" ] || wait "$DRIVER" 2>/dev/null
  # Then anything still running that names $DIR: TERM, up to 5 s to exit, then KILL.
  find_pids
  if [ "${#PIDS[@]}" -gt 0 ]; then
    echo "demo: stopping leftover processes: ${PIDS[*]}" >&2
    kill -TERM "${PIDS[@]}" 2>/dev/null
    deadline=$((SECONDS + 5))
    while find_pids; [ "${#PIDS[@]}" -gt 0 ] && [ "$SECONDS" -lt "$deadline" ]; do sleep 0.05; done
    [ "${#PIDS[@]}" -eq 0 ] || kill -KILL "${PIDS[@]}" 2>/dev/null
  fi
  FAILED_MSG="$(cat "$DIR/failed.txt" 2>/dev/null)"
  step "extension events (REPL_LOG=info REPL_LOG_FILE=$EVENTS; the processes' stderr too)"
  if [ -s "$EVENTS" ]; then sed 's/^/  /' "$EVENTS"; else echo "  (none)"; fi
  rm -rf "$DIR"
  find_pids
  echo
  if [ "${#PIDS[@]}" -gt 0 ]; then
    echo "demo: FAILED: processes still running after clean-up: ${PIDS[*]}" >&2; rc=1
  elif [ "$rc" -eq 0 ]; then
    echo "demo: OK in $(( ($(date +%s%N) - START_NS) / 1000000 )) ms; every process it started has exited, $DIR removed"
  else
    echo "demo: FAILED (exit code $rc)${FAILED_MSG:+: $FAILED_MSG}" >&2
    echo "demo: every process it started has exited, $DIR removed" >&2
  fi
  exit "$rc"
}
trap cleanup EXIT
trap 'exit 130' INT
trap 'exit 143' TERM

DIR="$(mktemp -d "${TMPDIR:-/tmp}/replica-demo.XXXXXX")"
EVENTS="$DIR/events.log"
# The extension's key=value event lines go to $EVENTS (REPL_LOG_FILE); the children's stderr
# goes there too, which also catches the lines of a build that still writes them to stderr.
export REPL_LOG=info REPL_LOG_FILE="$EVENTS"

echo "sqlite-replica demo in $DIR"
echo "  $("$SQLITE3" -version | cut -d' ' -f1) (sqlite3 shell), $("$PY" -V) at $PY, extension $EXT.so, shell pid $$"

# In the background and waited for, so that a signal runs the trap at once (bash defers traps
# while a foreground child runs). Its stdout and stderr are ours (its "demo: FAILED: ..." line
# stays on the terminal); it sends the stderr of the processes it starts to $EVENTS.
"$PY" scripts/demo.py run --dir "$DIR" --ext "$EXT" --sqlite3 "$SQLITE3" &
DRIVER=$!
echo "  driver pid $DRIVER"
wait "$DRIVER"
