"""The LD_PRELOAD kill shim shared by the crash tests: SIGKILL the process at an exact write.

The shim wraps ``pwrite``/``pwrite64``. It kills the process at its (REPL_CRASH_AFTER + 1)-th
pwrite to a file whose path ends with REPL_CRASH_SUFFIX -- before the write (REPL_CRASH_MODE
"before"), after writing half of it ("half") or after writing all of it ("after") -- counting only once the file named by
REPL_CRASH_ARM_FILE exists (when that variable is set). Before dying it writes ``KILL_MARKER``
to stderr, so a test can tell that the kill came from the shim.

``kill_shim`` in conftest.py compiles it once per session with the system C compiler.
"""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

KILL_MARKER = "crashshim: SIGKILL"

SHIM_C = r"""
#define _GNU_SOURCE
#include <dlfcn.h>
#include <signal.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/types.h>
#include <unistd.h>

/* SIGKILL this process at the (REPL_CRASH_AFTER + 1)-th pwrite to a file whose path ends with
   REPL_CRASH_SUFFIX, counting only once the file REPL_CRASH_ARM_FILE exists (when set): before
   the write (mode "before"), after writing half of it (mode "half") or all of it ("after"). */
static ssize_t (*real_pwrite64)(int, const void *, size_t, off_t);
static long countdown = -2;

static int matches(int fd) {
    const char *suffix = getenv("REPL_CRASH_SUFFIX");
    char link[64], path[4096];
    if (!suffix) return 0;
    snprintf(link, sizeof link, "/proc/self/fd/%d", fd);
    ssize_t n = readlink(link, path, sizeof path - 1);
    if (n <= 0) return 0;
    path[n] = 0;
    size_t ls = strlen(suffix);
    return (size_t)n >= ls && strcmp(path + n - ls, suffix) == 0;
}

static ssize_t hook(int fd, const void *buf, size_t count, off_t off) {
    if (!real_pwrite64) real_pwrite64 = dlsym(RTLD_NEXT, "pwrite64");
    if (countdown == -2) {
        const char *a = getenv("REPL_CRASH_AFTER");
        countdown = a ? atol(a) : -1;
    }
    const char *arm = getenv("REPL_CRASH_ARM_FILE");
    if (countdown >= 0 && (!arm || access(arm, F_OK) == 0) && matches(fd)) {
        if (countdown-- == 0) {
            const char *mode = getenv("REPL_CRASH_MODE");
            if (mode && strcmp(mode, "half") == 0) real_pwrite64(fd, buf, count / 2, off);
            if (mode && strcmp(mode, "after") == 0) real_pwrite64(fd, buf, count, off);
            static const char msg[] = "crashshim: SIGKILL\n";
            write(2, msg, sizeof msg - 1);
            kill(getpid(), SIGKILL);
        }
    }
    return real_pwrite64(fd, buf, count, off);
}

ssize_t pwrite64(int fd, const void *buf, size_t count, off_t off) { return hook(fd, buf, count, off); }
ssize_t pwrite(int fd, const void *buf, size_t count, off_t off) { return hook(fd, buf, count, off); }
"""


def build_kill_shim(directory: Path) -> str | None:
    """Compile the shim into ``directory``; None when there is no C compiler."""
    cc = shutil.which("cc") or shutil.which("gcc")
    if cc is None:
        return None
    src = directory / "crashshim.c"
    src.write_text(SHIM_C)
    so = directory / "crashshim.so"
    proc = subprocess.run([cc, "-shared", "-fPIC", "-O1", "-o", str(so), str(src), "-ldl"],
                          capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr
    return str(so)
