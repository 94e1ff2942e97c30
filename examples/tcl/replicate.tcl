#!/usr/bin/env tclsh
# sqlite-replica from Tcl (Debian's libsqlite3-tcl): a primary serving its log over HTTP in one
# process, a replica following it in another, a write forwarded from the replica with
# repl_exec, repl_wait, and equal checksums. Last line: "ok".
#
#     make build && tclsh examples/tcl/replicate.tcl
#
# Load first, then open: the extension is loaded through a throw-away ":memory:" handle, which
# registers the "replica" VFS as the process default and an auto-extension; every handle opened
# afterwards (`sqlite3 db app.db`) goes through the VFS and has the repl_* functions.
# `SELECT load_extension($ext)` passes no entry point, so SQLite derives sqlite3_replica_init
# from the file name libreplica.so (and appends ".so" itself).
#
# Tcl binds a variable that holds a plain string (`set timeout 5000`, or a number read from a
# pipe) as TEXT; the repl_* functions accept such numbers as they are.
#
# The script runs itself twice: without arguments it is the replica and starts
# `replicate.tcl primary DIR`, which prints "url <url>" and then answers "state" with
# "state <lsn> <checksum>" until its standard input says "quit" or closes.

package require sqlite3

set here [file dirname [file normalize [info script]]]
if {[info exists env(REPLICA_EXT)]} {
    set ext [file normalize $env(REPLICA_EXT)]
} else {
    set ext [file join [file dirname [file dirname $here]] build libreplica]
}

proc load_replica {} {
    sqlite3 boot :memory:
    boot enable_load_extension 1
    boot eval {SELECT load_extension($::ext)}
    boot close ;# the extension stays loaded: its init asks SQLite to keep it
}

proc primary {dir} {
    load_replica
    sqlite3 db [file join $dir primary.db]
    db eval {SELECT repl_primary('127.0.0.1:0')}
    db eval {SELECT repl_config('exec', 1)} ;# accept forwarded writes (off by default)
    set url [db onecolumn {SELECT json_extract(repl_status(), '$.server.url')}]
    db eval {
        CREATE TABLE notes(id INTEGER PRIMARY KEY, text TEXT NOT NULL);
        INSERT INTO notes(text) VALUES ('written on the primary');
    }
    puts "url $url"
    flush stdout
    while {[gets stdin line] >= 0} {
        switch -- $line {
            state {
                db eval {SELECT repl_lsn() AS lsn, repl_checksum() AS sum} {}
                puts "state $lsn $sum"
                flush stdout
            }
            quit { break }
            default { error "primary: unknown command '$line'" }
        }
    }
    db close
}

# --- the parent's view of the primary process: its stdout as lines, read with deadlines ---

proc on_readable {} {
    while {[gets $::chan line] >= 0} { lappend ::lines $line }
    if {[eof $::chan]} {
        set ::eof 1
        fileevent $::chan readable {}
    }
    set ::event readable
}

proc expect {prefix ms} {
    set deadline [expr {[clock milliseconds] + $ms}]
    while {![llength $::lines]} {
        if {$::eof} { error "the primary exited before printing '$prefix' (see its stderr above)" }
        set left [expr {$deadline - [clock milliseconds]}]
        if {$left <= 0} { error "the primary printed no '$prefix' line within $ms ms" }
        set timer [after $left {set ::event timeout}]
        vwait ::event
        after cancel $timer
    }
    set line [lindex $::lines 0]
    set ::lines [lrange $::lines 1 end]
    if {[lindex $line 0] ne $prefix} { error "the primary printed '$line', expected '$prefix'" }
    return [lrange $line 1 end]
}

# Ask the primary to quit, kill it if it has not exited within the deadline, return its status.
proc stop_primary {} {
    catch { puts $::chan quit; flush $::chan; close $::chan write }
    set deadline [expr {[clock milliseconds] + 10000}]
    while {!$::eof && [clock milliseconds] < $deadline} {
        set timer [after [expr {max(1, $deadline - [clock milliseconds])}] {set ::event timeout}]
        vwait ::event
        after cancel $timer
    }
    set killed 0
    if {!$::eof} {
        catch { exec kill -KILL [pid $::chan] }
        set killed 1
    }
    fconfigure $::chan -blocking 1
    set failed [catch { close $::chan } msg]
    if {$killed} { error "the primary did not exit within 10 s of quit; killed it" }
    if {$failed} { error "the primary process failed: $msg" }
}

proc replica {dir} {
    load_replica ;# first, before any database is opened in this process
    set ::lines {}
    set ::eof 0
    set ::chan [open |[list [info nameofexecutable] [info script] primary $dir 2>@stderr] r+]
    fconfigure $::chan -blocking 0 -buffering line
    fileevent $::chan readable on_readable
    try {
        set url [lindex [expect url 30000] 0]
        sqlite3 db [file join $dir replica.db]
        set lsn [db onecolumn {SELECT repl_follow($url)}]
        puts "replica bootstrapped from $url at LSN $lsn"

        # A write through the replica runs on the primary; repl_exec returns once it is here too.
        set params {["written through the replica"]}
        set lsn [db onecolumn {SELECT repl_exec('INSERT INTO notes(text) VALUES (?)', $params)}]
        set notes [db eval {SELECT text FROM notes ORDER BY id}]
        puts "after repl_exec (LSN $lsn) the replica reads $notes"

        # Equal checksums at the primary's LSN; both numbers are bound as TEXT.
        puts $::chan state
        lassign [expect state 10000] p_lsn p_sum
        set timeout_ms 5000
        set lsn [db onecolumn {SELECT repl_wait($p_lsn, $timeout_ms)}]
        set r_sum [db onecolumn {SELECT repl_checksum()}]
        puts "primary LSN $p_lsn checksum $p_sum; replica LSN $lsn checksum $r_sum"
        if {$r_sum ne $p_sum || [llength $notes] != 2} { error "the replica does not equal the primary" }

        # A local write on the replica is refused: writes go through repl_exec.
        if {![catch {db eval {INSERT INTO notes(text) VALUES ('local')}} err]} {
            error "a local write on the replica was accepted"
        }
        puts "a local write on the replica: $err"
        db eval {SELECT repl_follow(NULL)}
        db close
    } finally {
        stop_primary ;# always: the child never outlives us
    }
    puts ok
}

if {$argc == 2 && [lindex $argv 0] eq "primary"} {
    primary [lindex $argv 1]
} elseif {$argc == 0} {
    set base [expr {[info exists env(TMPDIR)] ? $env(TMPDIR) : "/tmp"}]
    set dir [file join $base tcl-replica-[pid]-[clock milliseconds]]
    file mkdir $dir
    set code 0
    try {
        replica $dir
    } on error {msg} {
        puts stderr "error: $msg"
        set code 1
    } finally {
        file delete -force $dir
    }
    exit $code
} else {
    puts stderr "usage: tclsh replicate.tcl  (runs both roles)  |  tclsh replicate.tcl primary DIR"
    exit 2
}
