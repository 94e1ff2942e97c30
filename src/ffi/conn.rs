//! Safe wrappers around connection-level host APIs: internal connections the extension opens
//! itself (through the host's API table), statements returning one value, and the per-database
//! file controls used to find our VFS file behind a user's connection.

pub use super::hooks::{
    AuthRequest, Authorizer, ProgressFn, SQLITE_AUTH, SQLITE_DBCONFIG_DEFENSIVE,
    SQLITE_DBCONFIG_NO_CKPT_ON_CLOSE, SQLITE_INTERRUPT, SQLITE_LIMIT_ATTACHED, SQLITE_TOOBIG,
};
use super::*;
use crate::error::{Error, Result};

/// A borrowed connection handle (a user's connection inside a function call).
#[derive(Clone, Copy)]
pub struct DbRef(pub *mut sqlite3);

/// A value read from a one-value query.
#[derive(Debug, Clone, PartialEq)]
pub enum SqlValue {
    Null,
    Int(i64),
    Real(f64),
    Text(String),
    Blob(Vec<u8>),
}

impl DbRef {
    /// The file name of database `schema` ("main"), or None for in-memory / temp databases.
    pub fn filename(&self, schema: &str) -> Option<String> {
        let f = api().db_filename?;
        let s = CString::new(schema).ok()?;
        // SAFETY: valid connection handle (inside a call on it) and valid schema string.
        let p = unsafe { f(self.0, s.as_ptr()) };
        cstr_to_string(p).filter(|n| !n.is_empty())
    }

    /// `sqlite3_uri_parameter(sqlite3_db_filename(db, schema), name)`: a query parameter of
    /// the URI the database was opened with (None when absent or not opened by URI).
    pub fn uri_parameter(&self, schema: &str, name: &str) -> Option<String> {
        let fname = api().db_filename?;
        let param = api().uri_parameter?;
        let s = CString::new(schema).ok()?;
        let n = CString::new(name).ok()?;
        // SAFETY: valid connection handle and schema string; db_filename's result is a
        // filename object sqlite3_uri_parameter accepts (documented), valid while the
        // database stays open, and the parameter name is a valid C string.
        let p = unsafe {
            let f = fname(self.0, s.as_ptr());
            if f.is_null() {
                return None;
            }
            param(f, n.as_ptr())
        };
        cstr_to_string(p)
    }

    /// `sqlite3_db_readonly(db, schema)`: 1 read-only, 0 read-write, -1 no such db.
    pub fn readonly(&self, schema: &str) -> i32 {
        let Some(f) = api().db_readonly else {
            return -1;
        };
        let s = CString::new(schema).unwrap_or_default();
        // SAFETY: valid connection handle and schema string.
        unsafe { f(self.0, s.as_ptr()) }
    }

    /// The top-level `sqlite3_file` of `schema` (SQLITE_FCNTL_FILE_POINTER), if open.
    pub fn file_pointer(&self, schema: &str) -> Option<*mut sqlite3_file> {
        let f = api().file_control?;
        let s = CString::new(schema).ok()?;
        let mut p: *mut sqlite3_file = std::ptr::null_mut();
        // SAFETY: FILE_POINTER writes one `sqlite3_file*` into the pointer we pass.
        let rc = unsafe {
            f(
                self.0,
                s.as_ptr(),
                SQLITE_FCNTL_FILE_POINTER,
                &mut p as *mut _ as *mut c_void,
            )
        };
        (rc == SQLITE_OK && !p.is_null()).then_some(p)
    }

    /// The name of the (top) VFS the database `schema` was opened with.
    pub fn vfs_name(&self, schema: &str) -> Option<String> {
        let f = api().file_control?;
        let s = CString::new(schema).ok()?;
        let mut p: *mut crate::ffi::sqlite3_vfs = std::ptr::null_mut();
        // SAFETY: VFS_POINTER writes one `sqlite3_vfs*` into the pointer we pass.
        let rc = unsafe {
            f(
                self.0,
                s.as_ptr(),
                SQLITE_FCNTL_VFS_POINTER,
                &mut p as *mut _ as *mut c_void,
            )
        };
        if rc != SQLITE_OK || p.is_null() {
            return None;
        }
        // SAFETY: a registered VFS outlives the connections opened with it; zName is a C string.
        cstr_to_string(unsafe { (*p).zName })
    }

    /// `sqlite3_db_config(db, op, on, NULL)` for a boolean option (e.g.
    /// `SQLITE_DBCONFIG_NO_CKPT_ON_CLOSE`); the host's return code.
    pub fn db_config_flag(&self, op: c_int, on: bool) -> c_int {
        let Some(f) = api().db_config else {
            return SQLITE_ERROR;
        };
        // SAFETY: the boolean db_config options take (int onoff, int *pResult); NULL is allowed
        // for pResult. Variadic arguments are passed with their C types.
        unsafe { f(self.0, op, on as c_int, std::ptr::null_mut::<c_int>()) }
    }

    /// Run SQL without results.
    pub fn exec(&self, sql: &str) -> Result<()> {
        let f = api().exec.expect("exec");
        let c = CString::new(sql).map_err(|_| Error::Misuse("SQL contains NUL".into()))?;
        let mut err: *mut c_char = std::ptr::null_mut();
        // SAFETY: valid handle, SQL string, no callback; `err` receives an sqlite3_malloc'd message.
        let rc = unsafe { f(self.0, c.as_ptr(), None, std::ptr::null_mut(), &mut err) };
        if rc != SQLITE_OK {
            let msg = cstr_to_string(err).unwrap_or_else(|| format!("error code {rc}"));
            sqlite_free(err as *mut c_void);
            return Err(sql_error(rc, format!("{sql}: {msg}")));
        }
        Ok(())
    }

    /// Run a query and return the first column of its first row (Null when no row).
    pub fn query_value(&self, sql: &str) -> Result<SqlValue> {
        let a = api();
        let c = CString::new(sql).map_err(|_| Error::Misuse("SQL contains NUL".into()))?;
        let mut stmt = std::ptr::null_mut();
        // SAFETY: valid handle and SQL; `stmt` receives a statement we finalize below.
        let rc = unsafe {
            a.prepare_v2.expect("prepare_v2")(
                self.0,
                c.as_ptr(),
                -1,
                &mut stmt,
                std::ptr::null_mut(),
            )
        };
        if rc != SQLITE_OK {
            return Err(sql_error(rc, format!("{sql}: {}", self.errmsg())));
        }
        // SAFETY: `stmt` is a valid prepared statement until finalize.
        let out = unsafe {
            let rc = a.step.expect("step")(stmt);
            let v = if rc == SQLITE_ROW {
                Ok(match a.column_type.expect("column_type")(stmt, 0) {
                    1 => SqlValue::Int(a.column_int64.expect("column_int64")(stmt, 0)),
                    2 => SqlValue::Real(a.column_double.expect("column_double")(stmt, 0)),
                    3 => SqlValue::Text(
                        cstr_to_string(
                            a.column_text.expect("column_text")(stmt, 0) as *const c_char
                        )
                        .unwrap_or_default(),
                    ),
                    4 => {
                        let p = a.column_blob.expect("column_blob")(stmt, 0) as *const u8;
                        let n = a.column_bytes.expect("column_bytes")(stmt, 0) as usize;
                        SqlValue::Blob(if p.is_null() {
                            vec![]
                        } else {
                            std::slice::from_raw_parts(p, n).to_vec()
                        })
                    }
                    _ => SqlValue::Null,
                })
            } else if rc == SQLITE_DONE {
                Ok(SqlValue::Null)
            } else {
                Err(sql_error(rc, format!("{sql}: {}", self.errmsg())))
            };
            a.finalize.expect("finalize")(stmt);
            v
        };
        out
    }

    /// The connection's last error message.
    pub fn errmsg(&self) -> String {
        let Some(f) = api().errmsg else {
            return String::new();
        };
        // SAFETY: valid handle; returned string owned by SQLite, copied immediately.
        cstr_to_string(unsafe { f(self.0) }).unwrap_or_default()
    }
}

pub(super) fn sql_error(rc: c_int, msg: String) -> Error {
    match rc & 0xff {
        SQLITE_BUSY => Error::Busy(msg),
        SQLITE_READONLY => Error::ReadOnly(msg),
        _ => Error::Other(msg),
    }
}

/// A connection opened by the extension itself; closed on drop (with the callbacks it holds:
/// the authorizer and progress handler stay alive exactly as long as the connection).
pub struct OwnedDb(pub(super) DbRef, pub(super) Hooks);

/// The closures registered on an `OwnedDb` (boxed twice: the C side holds the inner box's
/// address, which must not move while the connection is open).
#[derive(Default)]
pub(super) struct Hooks {
    pub(super) authorizer: Option<Box<Authorizer>>,
    pub(super) progress: Option<Box<ProgressFn>>,
}

// SAFETY: SQLite connections opened with the default (serialized or multi-thread) threading
// mode may move between threads as long as one thread uses them at a time, which the owner of
// an `OwnedDb` guarantees (it is only used behind `&mut` or a Mutex).
unsafe impl Send for OwnedDb {}

impl OwnedDb {
    /// Open `path` through VFS `vfs` with `flags`.
    pub fn open(path: &str, flags: c_int, vfs: Option<&CStr>) -> Result<OwnedDb> {
        let f = api().open_v2.expect("open_v2");
        let c = CString::new(path).map_err(|_| Error::Misuse("path contains NUL".into()))?;
        let mut db = std::ptr::null_mut();
        // SAFETY: valid path/VFS strings; `db` receives a handle we close on drop (also on error).
        let rc = unsafe {
            f(
                c.as_ptr(),
                &mut db,
                flags,
                vfs.map_or(std::ptr::null(), |v| v.as_ptr()),
            )
        };
        let owned = OwnedDb(DbRef(db), Hooks::default());
        if rc != SQLITE_OK {
            let msg = if db.is_null() {
                format!("error code {rc}")
            } else {
                owned.0.errmsg()
            };
            return Err(sql_error(rc, format!("cannot open {path}: {msg}")));
        }
        Ok(owned)
    }

    pub fn db(&self) -> DbRef {
        self.0
    }

    /// Set a busy timeout in milliseconds.
    pub fn busy_timeout(&self, ms: i32) {
        if let Some(f) = api().busy_timeout {
            // SAFETY: valid handle.
            unsafe { f(self.0 .0, ms) };
        }
    }
}

impl Drop for OwnedDb {
    fn drop(&mut self) {
        if self.0 .0.is_null() {
            return;
        }
        if let Some(f) = api().close_v2.or(api().close) {
            // SAFETY: handle opened by us, closed exactly once.
            unsafe { f(self.0 .0) };
        }
    }
}

/// What a script run by `DbRef::run_script` produced.
#[derive(Debug, Default)]
pub struct ScriptResult {
    /// Column names and rows of the last statement that returned rows (e.g. `RETURNING`).
    pub columns: Vec<String>,
    pub rows: Vec<Vec<SqlValue>>,
    /// `sqlite3_changes()` after the last statement; `sqlite3_last_insert_rowid()`.
    pub changes: i64,
    pub last_insert_rowid: i64,
}

/// An SQL error with the host's extended result code.
#[derive(Debug, Clone)]
pub struct SqlFailure {
    pub code: i32,
    pub message: String,
}

/// SQLITE_TRANSIENT: SQLite copies the bound bytes before bind_* returns.
fn transient() -> Option<unsafe extern "C" fn(*mut c_void)> {
    // SAFETY: SQLite defines SQLITE_TRANSIENT as the destructor value -1, which it compares
    // against and never calls; this is how every binding spells it.
    Some(unsafe { std::mem::transmute::<isize, unsafe extern "C" fn(*mut c_void)>(-1) })
}

/// One statement of a script, prepared but not run (`DbRef::prepare_script`).
#[derive(Debug, Clone)]
pub struct StmtInfo {
    /// Its text (`sqlite3_sql`).
    pub text: String,
    /// `sqlite3_stmt_readonly`: running it cannot change the database file.
    pub readonly: bool,
}

impl DbRef {
    /// Prepares each statement of `sql` in order without running any, and finalizes it at
    /// once. Returns the statements prepared, and the first failure (the statements after it
    /// are not looked at: where a statement that fails to prepare ends is unknown).
    pub fn prepare_script(&self, sql: &str) -> (Vec<StmtInfo>, Option<SqlFailure>) {
        let a = api();
        let mut out = Vec::new();
        let Ok(c) = CString::new(sql) else {
            let f = SqlFailure {
                code: 21,
                message: "the SQL contains a NUL byte".into(),
            };
            return (out, Some(f));
        };
        let mut tail: *const c_char = c.as_ptr();
        // SAFETY: `tail` points into `c` (NUL-terminated, alive for the loop); each statement
        // is finalized before the next prepare; `rest` points into the same buffer.
        unsafe {
            while *tail != 0 {
                let mut stmt = std::ptr::null_mut();
                let mut rest: *const c_char = std::ptr::null();
                let rc = a.prepare_v2.expect("prepare_v2")(self.0, tail, -1, &mut stmt, &mut rest);
                if rc != SQLITE_OK {
                    let f = SqlFailure {
                        code: self.extended_errcode(),
                        message: self.errmsg(),
                    };
                    return (out, Some(f));
                }
                tail = rest;
                if stmt.is_null() {
                    continue; // whitespace or a comment
                }
                out.push(StmtInfo {
                    text: cstr_to_string(a.sql.expect("sql")(stmt)).unwrap_or_default(),
                    readonly: a.stmt_readonly.expect("stmt_readonly")(stmt) != 0,
                });
                a.finalize.expect("finalize")(stmt);
            }
        }
        (out, None)
    }

    /// Runs every statement of `sql` in order, binding `params` positionally across them
    /// (each statement takes as many as it has parameters). All parameters must be used.
    pub fn run_script(
        &self,
        sql: &str,
        params: &[SqlValue],
    ) -> std::result::Result<ScriptResult, SqlFailure> {
        self.run_script_with(sql, params, &mut |_| Ok(()))
    }

    /// `run_script`, calling `on_row` with every row any statement produces (before it is
    /// kept); an error from `on_row` stops the script with that error.
    pub fn run_script_with(
        &self,
        sql: &str,
        params: &[SqlValue],
        on_row: &mut dyn FnMut(&[SqlValue]) -> std::result::Result<(), SqlFailure>,
    ) -> std::result::Result<ScriptResult, SqlFailure> {
        let a = api();
        let fail = |code: i32, message: String| SqlFailure { code, message };
        let c = CString::new(sql).map_err(|_| fail(21, "the SQL contains a NUL byte".into()))?;
        let mut out = ScriptResult::default();
        let mut next = 0usize;
        let mut tail: *const c_char = c.as_ptr();
        loop {
            // SAFETY: `tail` points into `c` (NUL-terminated, alive for the loop).
            if unsafe { *tail } == 0 {
                break;
            }
            let mut stmt = std::ptr::null_mut();
            let mut rest: *const c_char = std::ptr::null();
            // SAFETY: valid handle; `tail` is a NUL-terminated suffix of `c`; `stmt` receives
            // a statement finalized below; `rest` receives a pointer into the same buffer.
            let rc = unsafe {
                a.prepare_v2.expect("prepare_v2")(self.0, tail, -1, &mut stmt, &mut rest)
            };
            if rc != SQLITE_OK {
                return Err(fail(self.extended_errcode(), self.errmsg()));
            }
            tail = rest;
            if stmt.is_null() {
                continue; // whitespace or a comment
            }
            // SAFETY: `stmt` is a valid prepared statement until finalize at the end.
            let r = unsafe {
                let n = a.bind_parameter_count.expect("bind_parameter_count")(stmt) as usize;
                let mut rc = SQLITE_OK;
                if next + n > params.len() {
                    rc = -1;
                } else {
                    for (i, v) in params[next..next + n].iter().enumerate() {
                        let idx = (i + 1) as c_int;
                        rc = match v {
                            SqlValue::Null => a.bind_null.expect("bind_null")(stmt, idx),
                            SqlValue::Int(x) => a.bind_int64.expect("bind_int64")(stmt, idx, *x),
                            SqlValue::Real(x) => a.bind_double.expect("bind_double")(stmt, idx, *x),
                            SqlValue::Text(t) => a.bind_text.expect("bind_text")(
                                stmt,
                                idx,
                                t.as_ptr() as *const c_char,
                                t.len() as c_int,
                                transient(),
                            ),
                            SqlValue::Blob(b) => a.bind_blob.expect("bind_blob")(
                                stmt,
                                idx,
                                b.as_ptr() as *const c_void,
                                b.len() as c_int,
                                transient(),
                            ),
                        };
                        if rc != SQLITE_OK {
                            break;
                        }
                    }
                }
                let result = if rc == -1 {
                    Err(fail(
                        25,
                        format!(
                            "the SQL has more parameters than the {} values given",
                            params.len()
                        ),
                    ))
                } else if rc != SQLITE_OK {
                    Err(fail(self.extended_errcode(), self.errmsg()))
                } else {
                    next += n;
                    let ncol = a.column_count.expect("column_count")(stmt);
                    let mut rows = Vec::new();
                    loop {
                        let rc = a.step.expect("step")(stmt);
                        if rc == SQLITE_ROW {
                            let mut row = Vec::with_capacity(ncol as usize);
                            for i in 0..ncol {
                                row.push(column_value(stmt, i));
                            }
                            if let Err(e) = on_row(&row) {
                                break Err(e);
                            }
                            rows.push(row);
                        } else if rc == SQLITE_DONE {
                            break Ok(rows);
                        } else {
                            break Err(fail(self.extended_errcode(), self.errmsg()));
                        }
                    }
                    .map(|rows| {
                        if ncol > 0 {
                            out.columns = (0..ncol)
                                .map(|i| {
                                    cstr_to_string(a.column_name.expect("column_name")(stmt, i))
                                        .unwrap_or_default()
                                })
                                .collect();
                            out.rows = rows;
                        }
                    })
                };
                a.finalize.expect("finalize")(stmt);
                result
            };
            r?;
        }
        if next != params.len() {
            return Err(fail(
                25,
                format!(
                    "the SQL has {next} parameters but {} values were given",
                    params.len()
                ),
            ));
        }
        // SAFETY: valid handle.
        unsafe {
            out.changes = a.changes.expect("changes")(self.0) as i64;
            out.last_insert_rowid = a.last_insert_rowid.expect("last_insert_rowid")(self.0);
        }
        Ok(out)
    }

    /// `sqlite3_total_changes()`: rows changed by every statement since the connection opened.
    pub fn total_changes(&self) -> i64 {
        match api().total_changes {
            // SAFETY: valid handle.
            Some(f) => unsafe { f(self.0) as i64 },
            None => 0,
        }
    }

    /// `sqlite3_extended_errcode()` of the connection.
    pub fn extended_errcode(&self) -> i32 {
        match api().extended_errcode {
            // SAFETY: valid handle.
            Some(f) => unsafe { f(self.0) },
            None => 1,
        }
    }

    /// `sqlite3_get_autocommit()`: false inside an explicit transaction.
    pub fn autocommit(&self) -> bool {
        match api().get_autocommit {
            // SAFETY: valid handle.
            Some(f) => unsafe { f(self.0) != 0 },
            None => true,
        }
    }
}

/// Column `i` of the current row of `stmt`.
///
/// # Safety
/// `stmt` must be a valid statement positioned on a row, `i` < its column count.
unsafe fn column_value(stmt: *mut sqlite3ext_sys::sqlite3_stmt, i: c_int) -> SqlValue {
    let a = api();
    // SAFETY: guaranteed by the caller; pointers returned by column_* are copied at once.
    unsafe {
        match a.column_type.expect("column_type")(stmt, i) {
            1 => SqlValue::Int(a.column_int64.expect("column_int64")(stmt, i)),
            2 => SqlValue::Real(a.column_double.expect("column_double")(stmt, i)),
            3 => {
                let p = a.column_text.expect("column_text")(stmt, i);
                let n = a.column_bytes.expect("column_bytes")(stmt, i) as usize;
                SqlValue::Text(if p.is_null() {
                    String::new()
                } else {
                    String::from_utf8_lossy(std::slice::from_raw_parts(p, n)).into_owned()
                })
            }
            4 => {
                let p = a.column_blob.expect("column_blob")(stmt, i) as *const u8;
                let n = a.column_bytes.expect("column_bytes")(stmt, i) as usize;
                SqlValue::Blob(if p.is_null() {
                    vec![]
                } else {
                    std::slice::from_raw_parts(p, n).to_vec()
                })
            }
            _ => SqlValue::Null,
        }
    }
}
