# testfixture wrapper used by scripts/sqlite_tests.py (`make sqlite-tests`).
#
#   testfixture sqlite_tests_wrap.tcl ?SCRIPT ARGS...?
#
# Loads build/libreplica.so into testfixture before SQLite's test script runs, so that the
# `replica` VFS is the process default for every connection the test opens, then runs SCRIPT the
# way testfixture's own main loop does (argv0 = SCRIPT), or, without SCRIPT, reads commands from
# standard input like testfixture does (lock_common.tcl's child processes).
#
# Environment (set by scripts/sqlite_tests.py):
#   REPL_TEST_EXT       absolute path of libreplica (without .so)
#   REPL_TEST_MODE      passthrough | primary (primary: every file database opened with the Tcl
#                       `sqlite3` command is made a primary with SELECT repl_primary())
#   REPL_TEST_LAUNCHER  a shell script that execs `testfixture <this file> "$@"`: returned by
#                       [info nameofexecutable], so the child testfixture processes the tests
#                       start (crash tests, lock tests) load the extension too
#   REPL_TEST_STATS     a file to which each process appends one line of counters at exit
#   REPL_LOG=off        set by the runner: event lines on stderr would break Tcl child pipes

namespace eval ::repl {
  variable mode     $::env(REPL_TEST_MODE)
  variable ext      $::env(REPL_TEST_EXT)
  variable launcher $::env(REPL_TEST_LAUNCHER)
  variable statsfile {}
  if {[info exists ::env(REPL_TEST_STATS)]} { variable statsfile $::env(REPL_TEST_STATS) }
  # opens: file databases opened with the default VFS while `replica` was the default;
  # opens_unix: the same while it was not (after sqlite3_shutdown()+sqlite3_initialize());
  # opens_vfs: opened with an explicit -vfs (testvfs, crash, ...), stacked on whatever was
  # the default when that VFS was created
  variable n
  array set n {opens 0 opens_unix 0 opens_vfs 0 primary_ok 0 primary_err 0}
  variable errs
  array set errs {}
}

# --- load the extension on a throw-away :memory: connection ------------------------------------
# The extension makes `replica` the default VFS and adds its auto-extension once per process:
# after sqlite3_shutdown() + sqlite3_initialize() SQLite's os_init makes `unix` the default again,
# sqlite3_shutdown() drops every auto-extension, and loading the extension a second time restores
# neither (its registration is one-shot). SQLite's harness does such a cycle itself before any
# test runs (tester.tcl: sqlite3_shutdown; install_malloc_faultsim 1; sqlite3_initialize), and
# the crash children do one too (crash.tcl starts with "sqlite3_initialize ; sqlite3_shutdown").
# So the extension is loaded once, at the point after which the script opens its databases:
#   - a script that sources tester.tcl: right after tester.tcl's sqlite3_initialize;
#   - another script that calls sqlite3_shutdown (crash.tcl): right after its first one;
#   - any other script (tf_main.tcl, lock4's child, stdin): now.
# Later cycles inside a test file (wal.test, pager1.test, walro*.test, crashM.test) leave the
# rest of that file on `unix`: the wrapper counts those opens (opens_unix) instead of hiding them.
proc ::repl::load {} {
  variable loaded
  if {[info exists loaded]} return
  set loaded 1
  sqlite3 ::repl::boot :memory:
  ::repl::boot enable_load_extension 1
  ::repl::boot eval {SELECT load_extension($::repl::ext)}
  ::repl::boot close
  if {[lindex [sqlite3_vfs_list] 0] ne "replica"} {
    puts stderr "sqlite_tests_wrap: the default VFS is [lindex [sqlite3_vfs_list] 0], not replica"
    exit 3
  }
  # Primary mode: a test that deletes a database file (tester.tcl's forcedelete/delete_file, both
  # through do_delete_file) deletes its replication log directory <file>-replica with it, as
  # whoever deletes a primary's database does; otherwise the next database created under that name
  # meets the old log (see tests/sqlite-tests-expected.txt, "stale log directory").
  if {$::repl::mode eq "primary" && [llength [info procs ::do_delete_file]]} {
    rename ::do_delete_file ::repl::do_delete_file_c
    proc ::do_delete_file {force args} {
      set r [uplevel 1 [list ::repl::do_delete_file_c $force {*}$args]]
      foreach f $args {
        if {[string index $f 0] ne "-" && [file isdirectory $f-replica]} {
          catch {file delete -force -- $f-replica}
        }
      }
      return $r
    }
  }
}
proc ::repl::load_after {cmd} {
  rename ::$cmd ::repl::${cmd}_c
  proc ::$cmd {args} [string map [list CMD $cmd] {
    set r [::repl::CMD_c {*}$args]
    rename ::CMD {}
    rename ::repl::CMD_c ::CMD
    ::repl::load
    return $r
  }]
}
set ::repl::script {}
if {[llength $::argv] >= 1} {
  catch {
    set f [open [lindex $::argv 0]]
    set ::repl::script [read $f]
    close $f
  }
}
if {[string match *tester.tcl* $::repl::script]} {
  ::repl::load_after sqlite3_initialize
} elseif {[string match *sqlite3_shutdown* $::repl::script]} {
  ::repl::load_after sqlite3_shutdown
} else {
  ::repl::load
}

# --- children run through the launcher -----------------------------------------------------------
proc ::repl::nameofexecutable {} { return $::repl::launcher }
namespace ensemble configure ::info -map [dict replace \
    [namespace ensemble configure ::info -map] nameofexecutable ::repl::nameofexecutable]

# --- count opens; in primary mode make each file database a primary ------------------------------
rename ::sqlite3 ::repl::sqlite3_c
proc ::sqlite3 {args} {
  if {[llength $args] < 2 || [string index [lindex $args 0] 0] eq "-"} {
    return [uplevel 1 [list ::repl::sqlite3_c {*}$args]]
  }
  set res [uplevel 1 [list ::repl::sqlite3_c {*}$args]]
  set name [lindex $args 0]
  set file [lindex $args 1]
  set opts [lrange $args 2 end]
  if {$file eq "" || $file eq ":memory:" || [string match "*memory*" $file]} { return $res }
  if {[dict exists $opts -vfs]} {
    incr ::repl::n(opens_vfs)
  } elseif {[lindex [sqlite3_vfs_list] 0] eq "replica"} {
    incr ::repl::n(opens)
  } else {
    incr ::repl::n(opens_unix)
  }
  if {$::repl::mode eq "primary"} {
    if {[catch {uplevel 1 [list $name eval {SELECT repl_primary()}]} msg]} {
      incr ::repl::n(primary_err)
      # keep the message without paths or numbers so that the histogram stays small
      regsub -all {/[^ ]*|'[^']*'|"[^"]*"|[0-9]+} $msg {_} key
      regsub -all {\s+} $key { } key
      set key [string range $key 0 99]
      if {[info exists ::repl::errs($key)]} { incr ::repl::errs($key) } else { set ::repl::errs($key) 1 }
    } else {
      incr ::repl::n(primary_ok)
    }
  }
  return $res
}

proc ::repl::write_stats {} {
  variable statsfile
  if {$statsfile eq ""} return
  catch {
    set f [open $statsfile a]
    puts $f "pid [pid] [array get ::repl::n]"
    foreach {k v} [array get ::repl::errs] { puts $f "err\t$v\t$k" }
    close $f
  }
}
rename ::exit ::repl::exit_c
proc ::exit {args} { ::repl::write_stats; ::repl::exit_c {*}$args }

# --- run the script, or read commands from stdin, as testfixture's main loop does ----------------
if {[llength $::argv] >= 1} {
  set ::argv0 [lindex $::argv 0]
  set ::argv [lrange $::argv 1 end]
  set ::argc [llength $::argv]
  source $::argv0
  ::repl::write_stats
} else {
  set ::argv0 $::repl::launcher
  set line {}
  while {![eof stdin]} {
    if {$line ne ""} { puts -nonewline "> " } else { puts -nonewline "% " }
    flush stdout
    append line [gets stdin]
    if {[info complete $line]} {
      if {[catch {uplevel #0 $line} result]} {
        puts stderr "Error: $result"
      } elseif {$result ne ""} {
        puts $result
      }
      set line {}
    } else {
      append line \n
    }
  }
  ::repl::write_stats
}
