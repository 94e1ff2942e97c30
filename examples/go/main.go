// sqlite-replica from Go (database/sql + github.com/mattn/go-sqlite3): a primary serving its
// log over HTTP in one process, a replica following it in another, a write forwarded from the
// replica with repl_exec, repl_wait, and equal checksums. Last line: "ok".
//
// Build and run offline with Debian's golang-go and golang-github-mattn-go-sqlite3-dev
// (`make deps` installs both; go.mod points at /usr/share/gocode, so no module proxy):
//
//	make build
//	cd examples/go && GOPROXY=off go build -tags libsqlite3 -o go-replica . && ./go-replica
//
// The tag libsqlite3 links the system SQLite (libsqlite3-dev) instead of compiling the bundled
// amalgamation (Debian's package always does; upstream's module needs the tag for it).
//
// The program runs itself twice: `go-replica` (the replica, in the parent) starts
// `go-replica primary <dir>` (the primary, in a child), which prints "url <url>" and then answers
// "state" with "state <lsn> <checksum>" until its standard input says "quit" or closes.
//
// Loading, the part that matters in every Go program:
//
//  1. The entry point must be named: SQLiteConn.LoadExtension(path, "") passes an empty
//     string, not NULL, so SQLite looks up a symbol called "" and fails with "undefined
//     symbol:". Pass "sqlite3_replica_init".
//  2. Load it on a throw-away ":memory:" connection BEFORE sql.Open of a database file: that
//     registers the "replica" VFS as the process default and an auto-extension, so every
//     connection opened afterwards, by any driver name, goes through the VFS and has repl_*.
//     A ConnectHook that loads the extension on the file's own connection runs after SQLite
//     opened the file, so that connection would bypass the VFS (trap_test.go shows what then
//     happens).
package main

import (
	"bufio"
	"database/sql"
	"errors"
	"fmt"
	"io"
	"os"
	"os/exec"
	"path/filepath"
	"runtime"
	"strconv"
	"strings"
	"sync"
	"time"

	"github.com/mattn/go-sqlite3"
)

// EntryPoint is the extension's init function; Go's LoadExtension needs it by name.
const EntryPoint = "sqlite3_replica_init"

// ExtensionPath is $REPLICA_EXT or <repo>/build/libreplica, absolute and without ".so" (SQLite
// appends it). Absolute, because SQLite resolves a relative path against the current directory.
func ExtensionPath() string {
	if p := os.Getenv("REPLICA_EXT"); p != "" {
		if abs, err := filepath.Abs(p); err == nil {
			return abs
		}
		return p
	}
	if _, file, _, ok := runtime.Caller(0); ok && filepath.IsAbs(file) {
		return filepath.Join(filepath.Dir(file), "..", "..", "build", "libreplica")
	}
	wd, _ := os.Getwd()
	return filepath.Join(wd, "build", "libreplica")
}

var loadOnce sync.Once
var loadErr error

// LoadReplica loads the extension once per process through a ":memory:" connection of its own
// driver name. Call it before sql.Open of any database you want to replicate.
func LoadReplica() error {
	loadOnce.Do(func() {
		ext := ExtensionPath()
		sql.Register("sqlite3_replica_boot", &sqlite3.SQLiteDriver{
			ConnectHook: func(c *sqlite3.SQLiteConn) error {
				return c.LoadExtension(ext, EntryPoint)
			},
		})
		boot, err := sql.Open("sqlite3_replica_boot", ":memory:")
		if err != nil {
			loadErr = err
			return
		}
		defer boot.Close() // the extension stays loaded: its init asks SQLite to keep it
		if err := boot.Ping(); err != nil {
			loadErr = fmt.Errorf("loading %s.so: %w (run `make build` first, or set REPLICA_EXT)", ext, err)
		}
	})
	return loadErr
}

func main() {
	var err error
	if len(os.Args) == 3 && os.Args[1] == "primary" {
		err = runPrimary(os.Args[2])
	} else if len(os.Args) == 1 {
		err = runReplica()
	} else {
		err = errors.New("usage: go-replica            (runs both roles)\n       go-replica primary DIR")
	}
	if err != nil {
		fmt.Fprintln(os.Stderr, "error:", err)
		os.Exit(1)
	}
}

// runPrimary is the child: a primary serving its log on a free port of the loopback.
func runPrimary(dir string) error {
	if err := LoadReplica(); err != nil {
		return err
	}
	db, err := sql.Open("sqlite3", filepath.Join(dir, "primary.db"))
	if err != nil {
		return err
	}
	defer db.Close()
	var lsn int64
	if err := db.QueryRow("SELECT repl_primary('127.0.0.1:0')").Scan(&lsn); err != nil {
		return fmt.Errorf("repl_primary: %w", err)
	}
	// Accept writes forwarded by replicas (repl_exec); off by default.
	if _, err := db.Exec("SELECT repl_config('exec', 1)"); err != nil {
		return fmt.Errorf("repl_config: %w", err)
	}
	var url string
	if err := db.QueryRow("SELECT json_extract(repl_status(), '$.server.url')").Scan(&url); err != nil {
		return err
	}
	if _, err := db.Exec(`CREATE TABLE notes(id INTEGER PRIMARY KEY, text TEXT NOT NULL);
		INSERT INTO notes(text) VALUES ('written on the primary')`); err != nil {
		return err
	}
	fmt.Println("url", url)
	in := bufio.NewScanner(os.Stdin)
	for in.Scan() {
		switch in.Text() {
		case "state":
			var sum string
			if err := db.QueryRow("SELECT repl_lsn(), repl_checksum()").Scan(&lsn, &sum); err != nil {
				return err
			}
			fmt.Println("state", lsn, sum)
		case "quit":
			return nil
		default:
			return fmt.Errorf("primary: unknown command %q", in.Text())
		}
	}
	return in.Err() // EOF: the parent is gone
}

// child is the primary process seen from the parent: its stdin, and its stdout as lines.
type child struct {
	cmd   *exec.Cmd
	stdin io.WriteCloser
	lines chan string
	done  chan error
}

func startPrimary(dir string) (*child, error) {
	self, err := os.Executable()
	if err != nil {
		return nil, err
	}
	cmd := exec.Command(self, "primary", dir)
	cmd.Stderr = os.Stderr
	stdin, err := cmd.StdinPipe()
	if err != nil {
		return nil, err
	}
	stdout, err := cmd.StdoutPipe()
	if err != nil {
		return nil, err
	}
	if err := cmd.Start(); err != nil {
		return nil, err
	}
	c := &child{cmd: cmd, stdin: stdin, lines: make(chan string, 16), done: make(chan error, 1)}
	go func() {
		sc := bufio.NewScanner(stdout)
		for sc.Scan() {
			c.lines <- sc.Text()
		}
		close(c.lines)
		c.done <- cmd.Wait()
	}()
	return c, nil
}

// expect returns the next line of the child, which must start with prefix, within timeout.
func (c *child) expect(prefix string, timeout time.Duration) ([]string, error) {
	select {
	case line, ok := <-c.lines:
		if !ok {
			return nil, fmt.Errorf("the primary process exited before printing %q (see its stderr above)", prefix)
		}
		f := strings.Fields(line)
		if len(f) == 0 || f[0] != prefix {
			return nil, fmt.Errorf("the primary printed %q, expected %q", line, prefix)
		}
		return f[1:], nil
	case <-time.After(timeout):
		return nil, fmt.Errorf("the primary printed no %q line within %v", prefix, timeout)
	}
}

// stop asks the child to quit, and kills it if it has not exited within the deadline.
func (c *child) stop() error {
	fmt.Fprintln(c.stdin, "quit")
	c.stdin.Close()
	select {
	case err := <-c.done:
		return err
	case <-time.After(10 * time.Second):
		c.cmd.Process.Kill()
		<-c.done
		return errors.New("the primary process did not exit within 10 s of quit; killed it")
	}
}

// runReplica is the parent: it starts the primary, follows it, and writes through it.
func runReplica() (err error) {
	dir, err := os.MkdirTemp("", "go-replica-")
	if err != nil {
		return err
	}
	defer os.RemoveAll(dir)
	primary, err := startPrimary(dir)
	if err != nil {
		return err
	}
	stopped := false
	defer func() { // on any error: the child never outlives us
		if !stopped {
			primary.stop()
		}
	}()
	f, err := primary.expect("url", 30*time.Second)
	if err != nil {
		return err
	}
	url := f[0]

	if err := LoadReplica(); err != nil {
		return err
	}
	db, err := sql.Open("sqlite3", filepath.Join(dir, "replica.db"))
	if err != nil {
		return err
	}
	defer db.Close()
	var lsn int64
	if err := db.QueryRow("SELECT repl_follow(?)", url).Scan(&lsn); err != nil {
		return fmt.Errorf("repl_follow(%s): %w", url, err)
	}
	fmt.Printf("replica bootstrapped from %s at LSN %d\n", url, lsn)

	// A write through the replica runs on the primary; repl_exec returns once it is here too.
	err = db.QueryRow("SELECT repl_exec('INSERT INTO notes(text) VALUES (?)', ?)",
		`["written through the replica"]`).Scan(&lsn)
	if err != nil {
		return fmt.Errorf("repl_exec: %w", err)
	}
	var notes []string
	rows, err := db.Query("SELECT text FROM notes ORDER BY id")
	if err != nil {
		return err
	}
	for rows.Next() {
		var s string
		if err := rows.Scan(&s); err != nil {
			return err
		}
		notes = append(notes, s)
	}
	if err := rows.Err(); err != nil {
		return err
	}
	fmt.Printf("after repl_exec (LSN %d) the replica reads %q\n", lsn, notes)

	// Equal checksums at the primary's LSN.
	fmt.Fprintln(primary.stdin, "state")
	f, err = primary.expect("state", 10*time.Second)
	if err != nil {
		return err
	}
	pLSN, err := strconv.ParseInt(f[0], 10, 64)
	if err != nil {
		return err
	}
	pSum := f[1]
	if err := db.QueryRow("SELECT repl_wait(?, 5000)", pLSN).Scan(&lsn); err != nil {
		return fmt.Errorf("repl_wait(%d): %w", pLSN, err)
	}
	var rSum string
	if err := db.QueryRow("SELECT repl_checksum()").Scan(&rSum); err != nil {
		return err
	}
	fmt.Printf("primary LSN %d checksum %s; replica LSN %d checksum %s\n", pLSN, pSum, lsn, rSum)
	if rSum != pSum || len(notes) != 2 {
		return errors.New("the replica does not equal the primary")
	}

	// A local write on the replica is refused: writes go through repl_exec.
	_, werr := db.Exec("INSERT INTO notes(text) VALUES ('local')")
	if werr == nil {
		return errors.New("a local write on the replica was accepted")
	}
	fmt.Println("a local write on the replica:", werr)
	if err := db.QueryRow("SELECT repl_follow(NULL)").Scan(&lsn); err != nil {
		return err
	}
	stopped = true
	if err := primary.stop(); err != nil {
		return fmt.Errorf("primary process: %w", err)
	}
	fmt.Println("ok")
	return nil
}
