module sqlite-replica/examples/go

go 1.19

require github.com/mattn/go-sqlite3 v1.14.16

// Offline build against Debian's golang-github-mattn-go-sqlite3-dev (no module proxy needed):
// a directory replacement is neither downloaded nor checked against go.sum. Elsewhere, delete
// this line and run `go mod tidy` to fetch the module as usual.
replace github.com/mattn/go-sqlite3 => /usr/share/gocode/src/github.com/mattn/go-sqlite3
