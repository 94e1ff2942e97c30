//! SQL scalar function registration. Each function is a plain Rust `fn(&Call, &[SqlValue]) ->
//! Result<SqlValue>`; one generic trampoline converts arguments, runs it inside the panic guard
//! and turns `Err` into an SQL error carrying the message and our SQLite code (error.rs table).

use super::conn::{DbRef, SqlValue};
use super::*;
use crate::error::{Error, Result};

/// What a function body can see of its call.
pub struct Call {
    pub db: DbRef,
}

pub type ScalarFn = fn(&Call, &[SqlValue]) -> Result<SqlValue>;

const SQLITE_UTF8: c_int = 1;

/// Register `func` as `name` with `n_args` (-1 = variadic) on `db`.
pub fn register_scalar(db: *mut sqlite3, name: &str, n_args: c_int, func: ScalarFn) -> Result<()> {
    let f = api().create_function_v2.expect("create_function_v2");
    let cname = CString::new(name).expect("function names have no NUL");
    // The function pointer is boxed and handed to SQLite as user data; SQLite calls `destroy`
    // when the function is replaced or the connection closes.
    let boxed = Box::into_raw(Box::new(func)) as *mut c_void;
    // SAFETY: valid connection handle, name, and callbacks with the documented signatures;
    // `boxed` stays valid until SQLite calls `destroy_fn`.
    let rc = unsafe {
        f(
            db,
            cname.as_ptr(),
            n_args,
            SQLITE_UTF8,
            boxed,
            Some(trampoline),
            None,
            None,
            Some(destroy_fn),
        )
    };
    if rc != SQLITE_OK {
        return Err(Error::Sql {
            code: rc,
            message: format!("cannot register SQL function {name}: code {rc}"),
        });
    }
    Ok(())
}

unsafe extern "C" fn destroy_fn(p: *mut c_void) {
    guard((), || {
        if !p.is_null() {
            // SAFETY: `p` is the Box<ScalarFn> created in register_scalar, freed once here.
            drop(unsafe { Box::from_raw(p as *mut ScalarFn) });
        }
    })
}

unsafe extern "C" fn trampoline(
    ctx: *mut sqlite3_context,
    argc: c_int,
    argv: *mut *mut sqlite3_value,
) {
    guard((), || {
        let a = api();
        // SAFETY: SQLite passes a valid context; user data is our boxed ScalarFn.
        let func = unsafe { *(a.user_data.expect("user_data")(ctx) as *const ScalarFn) };
        // SAFETY: valid context.
        let db = DbRef(unsafe { a.context_db_handle.expect("context_db_handle")(ctx) });
        let mut args = Vec::with_capacity(argc.max(0) as usize);
        for i in 0..argc.max(0) as usize {
            // SAFETY: argv has argc valid value pointers for the duration of the call.
            let v = unsafe { *argv.add(i) };
            args.push(read_value(v));
        }
        let result = std::panic::catch_unwind(AssertUnwindSafe(|| func(&Call { db }, &args)))
            .unwrap_or_else(|_| {
                Err(Error::Other(
                    "internal error (panic) in sqlite-replica".into(),
                ))
            });
        match result {
            Ok(v) => set_result(ctx, v),
            Err(e) => set_error(ctx, &e),
        }
    })
}

fn read_value(v: *mut sqlite3_value) -> SqlValue {
    let a = api();
    // SAFETY: `v` is a valid protected value for the duration of the call.
    unsafe {
        match a.value_type.expect("value_type")(v) {
            1 => SqlValue::Int(a.value_int64.expect("value_int64")(v)),
            2 => SqlValue::Real(a.value_double.expect("value_double")(v)),
            3 => {
                let p = a.value_text.expect("value_text")(v);
                let n = a.value_bytes.expect("value_bytes")(v) as usize;
                SqlValue::Text(if p.is_null() {
                    String::new()
                } else {
                    String::from_utf8_lossy(std::slice::from_raw_parts(p, n)).into_owned()
                })
            }
            4 => {
                let p = a.value_blob.expect("value_blob")(v) as *const u8;
                let n = a.value_bytes.expect("value_bytes")(v) as usize;
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

/// SQLITE_TRANSIENT: SQLite copies the buffer before returning.
fn transient() -> Option<unsafe extern "C" fn(*mut c_void)> {
    // SAFETY: SQLite defines SQLITE_TRANSIENT as the destructor value -1; it is never called.
    Some(unsafe { std::mem::transmute::<isize, unsafe extern "C" fn(*mut c_void)>(-1isize) })
}

fn set_result(ctx: *mut sqlite3_context, v: SqlValue) {
    let a = api();
    // SAFETY: valid context; text/blob buffers are copied by SQLite (SQLITE_TRANSIENT).
    unsafe {
        match v {
            SqlValue::Null => a.result_null.expect("result_null")(ctx),
            SqlValue::Int(i) => a.result_int64.expect("result_int64")(ctx, i),
            SqlValue::Real(r) => a.result_double.expect("result_double")(ctx, r),
            SqlValue::Text(s) => a.result_text.expect("result_text")(
                ctx,
                s.as_ptr() as *const c_char,
                s.len() as c_int,
                transient(),
            ),
            SqlValue::Blob(b) => a.result_blob.expect("result_blob")(
                ctx,
                b.as_ptr() as *const c_void,
                b.len() as c_int,
                transient(),
            ),
        }
    }
}

fn set_error(ctx: *mut sqlite3_context, e: &Error) {
    let a = api();
    let msg = e.to_string();
    // SAFETY: valid context; the message is copied by SQLite (length given explicitly).
    unsafe {
        a.result_error.expect("result_error")(
            ctx,
            msg.as_ptr() as *const c_char,
            msg.len() as c_int,
        );
        // After the message: result_error_code keeps an existing message and only sets the
        // code (result_error itself would reset the code to SQLITE_ERROR).
        a.result_error_code.expect("result_error_code")(ctx, e.sqlite_code());
    }
}
