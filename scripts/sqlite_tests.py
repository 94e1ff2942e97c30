#!/usr/bin/env python3
"""SQLite's own Tcl tests as a regression gate for the `replica` VFS (`make sqlite-tests`).

1. Setup (idempotent; skipped entirely once the testfixture binary exists): add a deb-src entry for
   bookworm if apt has none (a separate /etc/apt/sources.list.d/sqlite-replica-src.sources,
   `Types: deb-src`; the system .sources file is not edited), `apt-get update`, install the build
   dependencies that are missing (tcl-dev, build-essential, dpkg-dev, zlib1g-dev), `apt-get source
   sqlite3` into build/sqlite-src/ (gitignored), configure it out of tree without the amalgamation
   and `make -j2 testfixture` under `nice -n 10`.
2. Run each test file of the list in three modes, each file in its own scratch directory
   build/sqlite-tests/<mode>/<file>/ with a per-file timeout, output in
   build/sqlite-tests/<mode>/<file>.log:
     baseline     plain testfixture
     passthrough  testfixture scripts/sqlite_tests_wrap.tcl <file>: libreplica is loaded first, so
                  `replica` is the default VFS (checked with sqlite3_vfs_list, opens counted)
     primary      the same, and every file database opened with the Tcl `sqlite3` command is made
                  a primary (SELECT repl_primary(); errors counted, not fatal)
   Child testfixture processes started by the tests go through the wrapper as well.
3. Compare each file's result ("N errors out of M tests", the failing test names, leak and
   open-file lines) with the baseline; print a table and write it as Markdown to
   build/sqlite-tests.md. A file whose result differs is run once more, alone, in both modes
   (timing-sensitive tests on a shared machine); it counts as different only if it differs again.
   Exit 1 if pass-through differs from the baseline for any file, or primary differs for a file
   not listed in tests/sqlite-tests-expected.txt.

Usage: scripts/sqlite_tests.py [--jobs N] [--timeout SECS] [--modes baseline,passthrough,primary]
                               [--setup-only] [FILE.test ...]
"""

import argparse
import concurrent.futures as cf
import glob
import os
import re
import shutil
import subprocess
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
BUILD = os.path.join(ROOT, "build")
SRC_DIR = os.path.join(BUILD, "sqlite-src")
BLD_DIR = os.path.join(SRC_DIR, "bld")
TESTFIXTURE = os.path.join(BLD_DIR, "testfixture")
RUN_DIR = os.environ.get("SQLITE_TESTS_RUN_DIR", os.path.join(BUILD, "sqlite-tests"))
REPORT = os.path.join(RUN_DIR + ".md")
EXT = os.environ.get("REPLICA_EXT", os.path.join(BUILD, "libreplica"))  # SQLite appends .so
WRAP = os.path.join(ROOT, "scripts", "sqlite_tests_wrap.tcl")
EXPECTED = os.path.join(ROOT, "tests", "sqlite-tests-expected.txt")
SRC_LIST = "/etc/apt/sources.list.d/sqlite-replica-src.sources"
NICE = ["nice", "-n", "10"]
BUILD_DEPS = ["build-essential", "dpkg-dev", "tcl-dev", "zlib1g-dev", "xz-utils"]

# The test files: every wal*, pager*, lock*, backup* and crash* file of the source tree except two,
# each over 2 minutes alone without the extension on the 2-core VM (README "SQLite's own tests"):
# walcrash3.test (over 4 minutes: hundreds of crash children per case) and backup_ioerr.test
# (86,000 I/O-error injections done by os_unix.c's test hooks, below the VFS). walthread.test
# (about 2.5 minutes, threads) stays: concurrency through the VFS is what it is for.
DEFAULT_FILES = """
wal.test wal2.test wal3.test wal4.test wal5.test wal6.test wal64k.test wal7.test wal8.test
wal9.test walbak.test walbig.test walblock.test walcksum.test walcrash.test walcrash2.test
walcrash4.test walfault.test walfault2.test walhook.test walmode.test walnoshm.test
waloverwrite.test walpersist.test walprotocol.test walprotocol2.test walro.test walro2.test
walrofault.test walsetlk.test walshared.test walslow.test walthread.test walvfs.test
pager1.test pager2.test pager3.test pager4.test pagerfault.test pagerfault2.test pagerfault3.test
pageropt.test
lock.test lock2.test lock3.test lock4.test lock5.test lock6.test lock7.test
backup.test backup2.test backup4.test backup5.test backup_malloc.test
crash.test crash2.test crash3.test crash4.test crash5.test crash6.test crash7.test crash8.test
crashM.test
""".split()

MODES = ["baseline", "passthrough", "primary"]


def log(msg):
    print(msg, flush=True)


def sh(cmd, **kw):
    log("+ " + " ".join(cmd))
    subprocess.run(cmd, check=True, **kw)


def apt_env():
    return dict(os.environ, DEBIAN_FRONTEND="noninteractive")


def sudo():
    return [] if os.geteuid() == 0 else ["sudo"]


def have_deb_src():
    files = glob.glob("/etc/apt/sources.list.d/*.sources") + glob.glob("/etc/apt/sources.list.d/*.list")
    files += ["/etc/apt/sources.list"]
    for f in files:
        try:
            text = open(f).read()
        except OSError:
            continue
        if f.endswith(".sources"):
            for stanza in re.split(r"\n\s*\n", text):
                if (re.search(r"^Types:.*\bdeb-src\b", stanza, re.M)
                        and re.search(r"^Suites:.*\bbookworm\b", stanza, re.M)
                        and not re.search(r"^Enabled:\s*no", stanza, re.M | re.I)):
                    return True
        elif re.search(r"^\s*deb-src\s.*\bbookworm\b", text, re.M):
            return True
    return False


def setup():
    """Fetch the Debian source of sqlite3 and build testfixture, unless it is already built."""
    if os.path.exists(TESTFIXTURE):
        log(f"testfixture: cached ({TESTFIXTURE})")
        return
    missing = [p for p in BUILD_DEPS
               if subprocess.run(["dpkg-query", "-W", "-f=${Status}", p], capture_output=True,
                                 text=True).stdout.strip() != "install ok installed"]
    updated = False
    if not have_deb_src():
        log(f"adding {SRC_LIST} (deb-src for bookworm)")
        stanza = ("Types: deb-src\nURIs: http://deb.debian.org/debian\n"
                  "Suites: bookworm bookworm-updates\nComponents: main\n"
                  "Signed-By: /usr/share/keyrings/debian-archive-keyring.gpg\n\n"
                  "Types: deb-src\nURIs: http://deb.debian.org/debian-security\n"
                  "Suites: bookworm-security\nComponents: main\n"
                  "Signed-By: /usr/share/keyrings/debian-archive-keyring.gpg\n")
        subprocess.run(sudo() + ["tee", SRC_LIST], input=stanza, text=True, check=True,
                       stdout=subprocess.DEVNULL)
        sh(sudo() + ["apt-get", "update", "-q"], env=apt_env())
        updated = True
    if missing:
        if not updated:
            sh(sudo() + ["apt-get", "update", "-q"], env=apt_env())
            updated = True
        sh(sudo() + ["apt-get", "install", "-y", "-q", "--no-install-recommends"] + missing,
           env=apt_env())
    os.makedirs(SRC_DIR, exist_ok=True)
    srcs = sorted(d for d in glob.glob(os.path.join(SRC_DIR, "sqlite3-*")) if os.path.isdir(d))
    if not srcs:
        try:
            sh(["apt-get", "source", "-q", "sqlite3"], cwd=SRC_DIR)
        except subprocess.CalledProcessError:
            if updated:
                raise
            sh(sudo() + ["apt-get", "update", "-q"], env=apt_env())
            sh(["apt-get", "source", "-q", "sqlite3"], cwd=SRC_DIR)
        srcs = sorted(d for d in glob.glob(os.path.join(SRC_DIR, "sqlite3-*")) if os.path.isdir(d))
    src = srcs[-1]
    log(f"building testfixture from {src} (nice -n 10, -j2; about 6 minutes on 2 busy cores)")
    shutil.rmtree(BLD_DIR, ignore_errors=True)
    os.makedirs(BLD_DIR)
    t0 = time.time()
    with open(os.path.join(BLD_DIR, "build.log"), "w") as out:
        subprocess.run(NICE + [os.path.join(src, "configure"), "--with-tcl=/usr/lib/tcl8.6",
                               "--disable-amalgamation", "--disable-shared"],
                       cwd=BLD_DIR, stdout=out, stderr=subprocess.STDOUT, check=True)
        r = subprocess.run(NICE + ["make", "-j2", "testfixture"], cwd=BLD_DIR, stdout=out,
                           stderr=subprocess.STDOUT)
    if r.returncode != 0 or not os.path.exists(TESTFIXTURE):
        sys.exit(f"testfixture build failed: see {BLD_DIR}/build.log")
    log(f"testfixture built in {time.time() - t0:.0f} s")


def test_dir():
    srcs = sorted(d for d in glob.glob(os.path.join(SRC_DIR, "sqlite3-*")) if os.path.isdir(d))
    return os.path.join(srcs[-1], "test")


def sqlite_version():
    srcs = sorted(d for d in glob.glob(os.path.join(SRC_DIR, "sqlite3-*")) if os.path.isdir(d))
    return open(os.path.join(srcs[-1], "VERSION")).read().strip()


def launcher():
    path = os.path.join(RUN_DIR, "testfixture-replica")
    os.makedirs(RUN_DIR, exist_ok=True)
    with open(path, "w") as f:
        f.write(f"#!/bin/sh\nexec '{TESTFIXTURE}' '{WRAP}' \"$@\"\n")
    os.chmod(path, 0o755)
    return path


SUMMARY = re.compile(r"^(\d+) errors out of (\d+) tests", re.M)
FAILS = re.compile(r"^!Failures on these tests:(.*)$", re.M)


def parse(text, rc, timed_out):
    """A file's result: a dict with a short display string and a comparison key."""
    m = None
    for m in SUMMARY.finditer(text):
        pass
    if timed_out:
        return {"show": "timeout", "key": "timeout", "errors": None}
    if m is None:
        return {"show": f"no summary (exit {rc})", "key": f"nosummary:{rc}", "errors": None}
    errors, tests = int(m.group(1)), int(m.group(2))
    fails = FAILS.findall(text)
    failset = sorted(set(fails[-1].split())) if fails else []
    extra = []
    if "Unfreed memory" in text:
        extra.append("leak")
    if re.search(r"files were left open", text):
        extra.append("files left open")
    show = f"{errors}/{tests}"
    if extra:
        show += " (" + ", ".join(extra) + ")"
    # The number of tests is shown but not compared: crash.test's loops run until a crash
    # leaves the file intact, so it counts 870 or 885 or 891 tests from one run to the next.
    return {"show": show, "key": (errors, tuple(failset), tuple(extra)), "errors": errors,
            "fails": failset}


def run_one(mode, name, timeout, tdir, launch, attempt=1):
    wd = os.path.join(RUN_DIR, mode, name + ("" if attempt == 1 else f".{attempt}"))
    shutil.rmtree(wd, ignore_errors=True)
    os.makedirs(wd)
    logf = wd + ".log"
    stats = wd + ".stats"
    for leftover in (stats, wd + ".rc"):
        if os.path.exists(leftover):
            os.unlink(leftover)
    env = dict(os.environ, REPL_LOG="off")
    for k in ("REPL_TEST_MODE", "REPL_TEST_EXT", "REPL_TEST_LAUNCHER", "REPL_TEST_STATS"):
        env.pop(k, None)
    cmd = ["timeout", "-k", "10", str(timeout)] + NICE + [TESTFIXTURE]
    if mode != "baseline":
        env.update(REPL_TEST_MODE=mode, REPL_TEST_EXT=EXT, REPL_TEST_LAUNCHER=launch,
                   REPL_TEST_STATS=stats)
        cmd.append(WRAP)
    cmd.append(os.path.join(tdir, name))
    t0 = time.time()
    with open(logf, "w") as out:
        r = subprocess.run(cmd, cwd=wd, env=env, stdin=subprocess.DEVNULL, stdout=out,
                           stderr=subprocess.STDOUT)
    with open(wd + ".rc", "w") as out:
        out.write(f"{r.returncode} {time.time() - t0:.1f}\n")
    # the scratch directory can be large (walbig, wal64k): keep the log, drop the files
    shutil.rmtree(wd, ignore_errors=True)
    return result_from_log(mode, name, attempt)


def result_from_log(mode, name, attempt=1):
    """Parse a finished run's log, exit status and counters (also used by --compare-only)."""
    wd = os.path.join(RUN_DIR, mode, name + ("" if attempt == 1 else f".{attempt}"))
    if not os.path.exists(wd + ".rc"):
        return None
    rc, secs = open(wd + ".rc").read().split()
    rc, secs = int(rc), float(secs)
    text = open(wd + ".log", errors="replace").read()
    res = parse(text, rc, rc in (124, 137))
    res["secs"] = secs
    res["stats"] = read_stats(wd + ".stats")
    return res


def read_stats(path):
    """Counters the wrapper appended: one `pid N key value ...` line per process, then one
    `err<TAB>count<TAB>message` line per distinct repl_primary() error."""
    tot = {"procs": 0, "opens": 0, "opens_unix": 0, "opens_vfs": 0, "primary_ok": 0,
           "primary_err": 0, "errs": {}}
    if not os.path.exists(path):
        return tot
    for line in open(path, errors="replace"):
        line = line.rstrip("\n")
        if line.startswith("pid "):
            words = line.split()
            tot["procs"] += 1
            d = dict(zip(words[2::2], words[3::2]))
            for k in ("opens", "opens_unix", "opens_vfs", "primary_ok", "primary_err"):
                tot[k] += int(d.get(k, "0")) if d.get(k, "0").isdigit() else 0
        elif line.startswith("err\t"):
            _, cnt, msg = line.split("\t", 2)
            tot["errs"][msg] = tot["errs"].get(msg, 0) + int(cnt)
    return tot


def strip_extra(key):
    """A result key without its leak / open-file flags."""
    return key[:2] if isinstance(key, tuple) else key


def load_expected():
    exp = {}
    if not os.path.exists(EXPECTED):
        return exp
    for line in open(EXPECTED):
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        parts = [p.strip() for p in line.split("|")]
        exp[parts[0]] = parts[1:] if len(parts) > 1 else ["", ""]
    return exp


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("files", nargs="*")
    ap.add_argument("--jobs", type=int, default=int(os.environ.get("SQLITE_TESTS_JOBS", "2")))
    ap.add_argument("--timeout", type=int, default=int(os.environ.get("SQLITE_TESTS_TIMEOUT", "300")))
    ap.add_argument("--modes", default=",".join(MODES))
    ap.add_argument("--setup-only", action="store_true")
    ap.add_argument("--no-retry", action="store_true")
    ap.add_argument("--compare-only", action="store_true",
                    help="do not run anything: compare the logs of the last run again")
    a = ap.parse_args()

    t_start = time.time()
    setup()
    if a.setup_only:
        return 0
    if not os.path.exists(EXT + ".so"):
        sys.exit(f"{EXT}.so missing: run `make build` first")
    files = a.files or os.environ.get("SQLITE_TESTS", "").split() or DEFAULT_FILES
    modes = [m for m in a.modes.split(",") if m]
    if "baseline" not in modes:
        modes.insert(0, "baseline")
    tdir = test_dir()
    launch = launcher()
    if a.compare_only:
        results = {(m, f): result_from_log(m, f) for f in files for m in modes}
        missing = [f"{f} ({m})" for (m, f), r in results.items() if r is None]
        if missing:
            sys.exit("no finished run for: " + ", ".join(missing))
        retried = {}
        for f in files:
            for m in modes[1:]:
                b2, m2 = result_from_log("baseline", f, 2), result_from_log(m, f, 2)
                if b2 and m2 and results[(m, f)]["key"] != results[("baseline", f)]["key"]:
                    retried[(m, f)] = (b2, m2)
        return report(a, files, modes, results, retried, t_start, compared_only=True)
    for m in modes:
        shutil.rmtree(os.path.join(RUN_DIR, m), ignore_errors=True)
        os.makedirs(os.path.join(RUN_DIR, m))
    log(f"SQLite {sqlite_version()} testfixture, {len(files)} files x {len(modes)} modes, "
        f"{a.jobs} at a time, timeout {a.timeout} s per file")

    results = {}
    jobs = [(m, f) for f in files for m in modes]
    with cf.ThreadPoolExecutor(max_workers=a.jobs) as pool:
        futs = {pool.submit(run_one, m, f, a.timeout, tdir, launch): (m, f) for m, f in jobs}
        for fut in cf.as_completed(futs):
            m, f = futs[fut]
            results[(m, f)] = r = fut.result()
            log(f"  {f:22s} {m:12s} {r['show']:28s} {r['secs']:6.1f} s")

    # A difference is confirmed by running the file again, alone, in baseline and that mode.
    # Only differences that would fail the gate: not primary ones the list explains.
    retried = {}
    expected = load_expected()
    if not a.no_retry:
        for f in files:
            for m in modes[1:]:
                rk, bk = results[(m, f)]["key"], results[("baseline", f)]["key"]
                if m == "primary" and (f in expected or
                                       ("*" in expected and strip_extra(rk) == strip_extra(bk))):
                    continue
                if rk != bk:
                    log(f"  {f}: {m} differs from baseline, running both again")
                    b2 = run_one("baseline", f, a.timeout, tdir, launch, attempt=2)
                    m2 = run_one(m, f, a.timeout, tdir, launch, attempt=2)
                    retried[(m, f)] = (b2, m2)
                    log(f"    again: baseline {b2['show']}, {m} {m2['show']}")
    return report(a, files, modes, results, retried, t_start)


def report(a, files, modes, results, retried, t_start, compared_only=False):
    expected = load_expected()
    rows, bad = [], []
    for f in files:
        base = results[("baseline", f)]
        row = {"file": f, "baseline": base["show"]}
        verdicts = []
        for m in modes[1:]:
            r = results[(m, f)]
            row[m] = r["show"]
            same = r["key"] == base["key"]
            if not same and (m, f) in retried:
                b2, m2 = retried[(m, f)]
                if m2["key"] == b2["key"] or m2["key"] == base["key"]:
                    same = True
                    row[m] += " (again: same)"
                else:
                    row[m] += f" (again: {m2['show']} vs {b2['show']})"
            if same:
                verdicts.append("same")
            elif m == "primary" and "*" in expected and strip_extra(r["key"]) == strip_extra(base["key"]):
                verdicts.append("same but leak (expected: *)")
            elif m == "primary" and f in expected:
                verdicts.append("expected")
            else:
                verdicts.append("**DIFFERS**")
                bad.append((m, f))
        row["same"] = " / ".join(verdicts)
        rows.append(row)

    # counters from the wrapper: opens through the VFS, child processes, repl_primary() outcomes
    summary = {}
    for m in modes[1:]:
        tot = {"procs": 0, "opens": 0, "opens_unix": 0, "opens_vfs": 0, "primary_ok": 0,
               "primary_err": 0, "errs": {}}
        for f in files:
            s = results[(m, f)]["stats"]
            for k in tot:
                if k == "errs":
                    for msg, c in s["errs"].items():
                        tot["errs"][msg] = tot["errs"].get(msg, 0) + c
                else:
                    tot[k] += s[k]
        summary[m] = tot

    if compared_only:
        elapsed = sum(r["secs"] for r in results.values()) / max(a.jobs, 1)
    else:
        elapsed = time.time() - t_start
    cols = ["file", "baseline"] + modes[1:] + ["same"]
    head = {"passthrough": "pass-through", "same": "same?"}
    md = ["| " + " | ".join(head.get(c, c) for c in cols) + " |",
          "|" + "|".join("---" for _ in cols) + "|"]
    for r in rows:
        md.append("| " + " | ".join(r.get(c, "") for c in cols) + " |")
    md.append("")
    md.append(f"SQLite {sqlite_version()} testfixture (Debian source package), {len(files)} files; "
              f"results are `errors/tests`; same? is pass-through / primary against the baseline "
              f"(expected = listed in tests/sqlite-tests-expected.txt); "
              f"{elapsed / 60:.1f} min {'of test time / jobs' if compared_only else 'wall clock'} "
              f"({a.jobs} files at a time, `nice -n 10`).")
    for m in modes[1:]:
        s = summary[m]
        line = (f"{head.get(m, m)}: {s['opens']} file-database opens with `replica` as the default "
                f"VFS, {s['opens_unix']} after the default had reverted to `unix`, {s['opens_vfs']} "
                f"through an explicit test VFS; {s['procs']} testfixture processes with the "
                f"extension loaded")
        if m == "primary":
            line += f"; `repl_primary()` succeeded {s['primary_ok']} times, failed {s['primary_err']}"
        md.append("")
        md.append(line + ".")
        if m == "primary" and s["errs"]:
            md.append("")
            md.append("| `repl_primary()` error (numbers and quoted names replaced by `_`) | count |")
            md.append("|---|---|")
            for msg, c in sorted(s["errs"].items(), key=lambda kv: -kv[1]):
                md.append(f"| {msg.replace('|', '/')} | {c} |")
    unused = [f for f in expected if f in files and
              [rr["same"] for rr in rows if rr["file"] == f][0].endswith("/ same")]
    if unused:
        md.append("")
        md.append("Listed as expected differences but the same this run: " + ", ".join(unused) + ".")
    text = "\n".join(md) + "\n"
    with open(REPORT, "w") as out:
        out.write(text)
    print()
    print(text)
    log(f"written to {REPORT}; logs in {RUN_DIR}/<mode>/<file>.log")
    if bad:
        log("FAIL: unexpected differences: " + ", ".join(f"{f} ({m})" for m, f in bad))
        return 1
    log("OK: pass-through identical to the baseline; primary differs only where "
        "tests/sqlite-tests-expected.txt says why")
    return 0


if __name__ == "__main__":
    sys.exit(main())
