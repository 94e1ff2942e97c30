// The naive way to load sqlite-replica from database/sql, and why it must never lose a write.
//
// A driver whose ConnectHook loads the extension looks natural, but the hook runs after SQLite
// opened the database file: the FIRST pool connection opened that file through the default
// (unix) VFS, before the extension existed in the process, so its writes would bypass the
// replication log. Connections opened later go through the "replica" VFS (the first load
// registered it as the default) and are fine. The extension must therefore refuse that first
// load loudly ("... opened it before the extension was loaded ...") so the application sees an
// error instead of a write that replicas only learn about through a gap and a new generation.
//
// Each scenario runs in its own process (this test binary re-executed with REPLICA_TEST_ROLE),
// because loading the extension is once per process and the trap needs a process that has
// not loaded it yet.
//
//	cd examples/go && GOPROXY=off go test -tags libsqlite3 -v .
package main

import (
	"bufio"
	"context"
	"database/sql"
	"encoding/json"
	"fmt"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"github.com/mattn/go-sqlite3"
)

func TestMain(m *testing.M) {
	if role := os.Getenv("REPLICA_TEST_ROLE"); role != "" {
		os.Exit(helper(role, os.Getenv("REPLICA_TEST_DB")))
	}
	os.Exit(m.Run())
}

// helper runs one role in a child process and prints "key value" lines for the parent.
func helper(role, path string) int {
	if err := helperRole(role, path); err != nil {
		fmt.Fprintln(os.Stderr, "helper", role, "failed:", err)
		return 1
	}
	return 0
}

func helperRole(role, path string) error {
	switch role {
	case "make-primary": // the recommended way: load first, then open
		if err := LoadReplica(); err != nil {
			return err
		}
		db, err := sql.Open("sqlite3", path)
		if err != nil {
			return err
		}
		defer db.Close()
		if _, err := db.Exec(`SELECT repl_primary();
			CREATE TABLE notes(id INTEGER PRIMARY KEY, text TEXT NOT NULL);
			INSERT INTO notes(text) VALUES ('written by a process that loaded first')`); err != nil {
			return err
		}
		return printStatus(db)

	case "naive-hook": // the trap: the hook loads the extension on the file's own connection
		sql.Register("sqlite3_naive_hook", &sqlite3.SQLiteDriver{
			ConnectHook: func(c *sqlite3.SQLiteConn) error {
				return c.LoadExtension(ExtensionPath(), EntryPoint)
			},
		})
		db, err := sql.Open("sqlite3_naive_hook", path)
		if err != nil {
			return err
		}
		defer db.Close()
		fmt.Println("ping_error", oneLine(db.Ping()))
		_, err = db.Exec("INSERT INTO notes(text) VALUES ('written through the naive hook')")
		fmt.Println("write_error", oneLine(err))
		return nil

	case "status": // a later process that loads correctly, commits once more, and reports
		if err := LoadReplica(); err != nil {
			return err
		}
		db, err := sql.Open("sqlite3", path)
		if err != nil {
			return err
		}
		defer db.Close()
		if _, err := db.Exec("INSERT INTO notes(text) VALUES ('written by a later process')"); err != nil {
			return err
		}
		var texts string
		if err := db.QueryRow("SELECT group_concat(text, '|') FROM notes").Scan(&texts); err != nil {
			return err
		}
		fmt.Println("notes", texts)
		return printStatus(db)
	}
	return fmt.Errorf("unknown role %q", role)
}

func printStatus(db *sql.DB) error {
	var status string
	if err := db.QueryRow("SELECT repl_status()").Scan(&status); err != nil {
		return err
	}
	fmt.Println("status", status)
	return nil
}

func oneLine(err error) string {
	if err == nil {
		return ""
	}
	return strings.ReplaceAll(err.Error(), "\n", " ")
}

// runRole runs this test binary as role on path and returns its "key value" lines.
func runRole(t *testing.T, role, path string) map[string]string {
	t.Helper()
	cmd := exec.Command(os.Args[0], "-test.run=^$")
	cmd.Env = append(os.Environ(), "REPLICA_TEST_ROLE="+role, "REPLICA_TEST_DB="+path)
	var stderr strings.Builder
	cmd.Stderr = &stderr
	done := make(chan struct{})
	timer := time.AfterFunc(60*time.Second, func() {
		select {
		case <-done:
		default:
			cmd.Process.Kill()
		}
	})
	out, err := cmd.Output()
	close(done)
	timer.Stop()
	if err != nil {
		t.Fatalf("role %s: %v\nstdout:\n%s\nstderr:\n%s", role, err, out, stderr.String())
	}
	kv := map[string]string{}
	sc := bufio.NewScanner(strings.NewReader(string(out)))
	sc.Buffer(make([]byte, 1<<20), 1<<20)
	for sc.Scan() {
		k, v, _ := strings.Cut(sc.Text(), " ")
		kv[k] = v
	}
	t.Logf("role %s: %v\nstderr:\n%s", role, kv, stderr.String())
	return kv
}

type status struct {
	Role       *string `json:"role"`
	LSN        int64   `json:"lsn"`
	Generation int64   `json:"generation"`
	Gaps       int64   `json:"gaps"`
}

func parseStatus(t *testing.T, kv map[string]string) status {
	t.Helper()
	var s status
	if err := json.Unmarshal([]byte(kv["status"]), &s); err != nil {
		t.Fatalf("repl_status() is not the JSON expected: %v: %q", err, kv["status"])
	}
	if s.Role == nil || *s.Role != "primary" {
		t.Fatalf("the database is not a primary: %q", kv["status"])
	}
	return s
}

// TestNaiveConnectHookNeverWritesUncaptured: the first connection of a ConnectHook driver on a
// primary either fails with an error that tells the application what went wrong, or its write
// is captured; never a silent gap that forces a new generation on every replica.
func TestNaiveConnectHookNeverWritesUncaptured(t *testing.T) {
	path := filepath.Join(t.TempDir(), "app.db")
	before := parseStatus(t, runRole(t, "make-primary", path))
	naive := runRole(t, "naive-hook", path)
	after := runRole(t, "status", path)
	now := parseStatus(t, after)

	if msg := naive["ping_error"]; msg != "" {
		// The refusal: the first connection's error reaches the application at once.
		if !strings.Contains(msg, "opened it before the extension was loaded") {
			t.Errorf("the first connection failed, but not with the refusal that says what to do: %q", msg)
		}
		// Connections opened afterwards go through the VFS and work.
		if naive["write_error"] != "" {
			t.Errorf("after the refused first connection, a new pool connection could not write: %q", naive["write_error"])
		}
	} else if naive["write_error"] != "" {
		t.Errorf("the first connection opened, then its write failed: %q", naive["write_error"])
	}
	if now.Generation != before.Generation {
		cause := "the first connection's write bypassed capture; it must fail instead"
		if naive["ping_error"] != "" {
			// Seen with the first refusal: closing the refused connection, the last one on the
			// file in that process, checkpointed and deleted the WAL through the plain VFS.
			cause = "the first connection was refused, but closing it (SQLite checkpoints and " +
				"deletes the WAL when the last connection closes) reset the WAL behind the " +
				"extension's back; a refused connection must not checkpoint on close " +
				"(SQLITE_DBCONFIG_NO_CKPT_ON_CLOSE)"
		}
		t.Errorf("the primary silently started generation %d (it was %d), so every replica must "+
			"re-snapshot: %s (status after: %s)", now.Generation, before.Generation, cause, after["status"])
	}
	if !strings.Contains(after["notes"], "written through the naive hook") {
		t.Errorf("the write through the naive hook's pool is missing: %q", after["notes"])
	}
	if now.Gaps != before.Gaps {
		t.Errorf("the primary detected %d gap(s) (writes it did not capture)", now.Gaps-before.Gaps)
	}
}

// TestEmptyEntryPointFails pins down why the entry point must be named in Go:
// LoadExtension(path, "") passes "" (not NULL), so SQLite does not derive the name.
func TestEmptyEntryPointFails(t *testing.T) {
	sql.Register("sqlite3_empty_entry", &sqlite3.SQLiteDriver{
		ConnectHook: func(c *sqlite3.SQLiteConn) error { return c.LoadExtension(ExtensionPath(), "") },
	})
	db, err := sql.Open("sqlite3_empty_entry", ":memory:")
	if err != nil {
		t.Fatal(err)
	}
	defer db.Close()
	err = db.Ping()
	if err == nil || !strings.Contains(err.Error(), "undefined symbol") {
		t.Fatalf("LoadExtension(path, \"\") should fail with \"undefined symbol\", got %v", err)
	}
}

// TestLoadThenOpen is the recipe of main.go: a ":memory:" boot connection loads the extension,
// then a plain sql.Open of a file goes through the VFS on every pool connection.
func TestLoadThenOpen(t *testing.T) {
	if err := LoadReplica(); err != nil {
		t.Fatal(err)
	}
	db, err := sql.Open("sqlite3", filepath.Join(t.TempDir(), "app.db"))
	if err != nil {
		t.Fatal(err)
	}
	defer db.Close()
	db.SetMaxOpenConns(4)
	ctx := context.Background()
	if _, err := db.Exec("SELECT repl_primary(); CREATE TABLE t(x)"); err != nil {
		t.Fatal(err)
	}
	// Hold several pool connections at once: each must see the primary role (through the VFS).
	conns := make([]*sql.Conn, 3)
	for i := range conns {
		c, err := db.Conn(ctx)
		if err != nil {
			t.Fatal(err)
		}
		defer c.Close()
		conns[i] = c
		var role sql.NullString
		if err := c.QueryRowContext(ctx, "SELECT repl_role()").Scan(&role); err != nil {
			t.Fatal(err)
		}
		if role.String != "primary" {
			t.Fatalf("pool connection %d: repl_role() = %v, want primary", i, role)
		}
		if _, err := c.ExecContext(ctx, "INSERT INTO t VALUES (?)", i); err != nil {
			t.Fatal(err)
		}
	}
	var lsn int64
	if err := conns[0].QueryRowContext(ctx, "SELECT repl_lsn()").Scan(&lsn); err != nil {
		t.Fatal(err)
	}
	if lsn != 4 { // CREATE TABLE + three INSERTs, one LSN each
		t.Fatalf("repl_lsn() = %d, want 4", lsn)
	}
}

// TestExtensionsFieldDerivesEntryPoint: the driver's Extensions field loads with a NULL entry
// point, so SQLite derives sqlite3_replica_init from libreplica.so by itself (like the other
// hosts); only LoadExtension(path, "") needs the name spelled out.
func TestExtensionsFieldDerivesEntryPoint(t *testing.T) {
	sql.Register("sqlite3_replica_extensions", &sqlite3.SQLiteDriver{Extensions: []string{ExtensionPath()}})
	boot, err := sql.Open("sqlite3_replica_extensions", ":memory:")
	if err != nil {
		t.Fatal(err)
	}
	defer boot.Close()
	var version string
	if err := boot.QueryRow("SELECT repl_version()").Scan(&version); err != nil {
		t.Fatalf("loading through SQLiteDriver.Extensions: %v", err)
	}
	if version == "" {
		t.Fatal("repl_version() is empty")
	}
}
