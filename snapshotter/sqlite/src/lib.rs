//! How kiln opens and closes its SQLite databases (the cache store and the snapshot
//! metadata): one policy for both, since several kiln processes share them and each
//! process opens them once; and how their statements run ([`Cached`]).

use std::path::Path;
use std::time::Duration;

use rusqlite::{Connection, Params, Row};

/// How long a writer waits for another process's transaction.
const BUSY_TIMEOUT: Duration = Duration::from_secs(60);

/// A WAL larger than this is checkpointed (and truncated) when a database closes.
pub const FOLD_WAL_BYTES: u64 = 256 << 10;

/// How long that checkpoint waits for other processes' transactions.
const FOLD_WAIT: Duration = Duration::from_millis(100);

/// Prepared statements a connection keeps: more than the distinct statements of either
/// database, so none is compiled twice by one process.
const STATEMENT_CACHE: usize = 64;

/// Opens (creating if needed) the database at `path`: WAL (persistent in the file, so set
/// only when it is not yet), `synchronous=NORMAL` (every transaction atomic across a
/// crash; power loss may lose only the last ones), writers waiting for each other, and no
/// checkpoint when the connection closes (two fsyncs per kiln process; commits
/// checkpoint when the WAL grows, which is as crash-safe) — see [`fold_large_wal`].
pub fn open(path: &Path) -> rusqlite::Result<Connection> {
    let conn = Connection::open(path)?;
    conn.busy_timeout(BUSY_TIMEOUT)?;
    let journal: String = conn.pragma_query_value(None, "journal_mode", |r| r.get(0))?;
    if !journal.eq_ignore_ascii_case("wal") {
        conn.pragma_update(None, "journal_mode", "WAL")?;
    }
    conn.pragma_update(None, "synchronous", "NORMAL")?;
    conn.set_db_config(
        rusqlite::config::DbConfig::SQLITE_DBCONFIG_NO_CKPT_ON_CLOSE,
        true,
    )?;
    conn.set_prepared_statement_cache_capacity(STATEMENT_CACHE);
    Ok(conn)
}

/// `execute` and `query_row` through the connection's statement cache: rusqlite's own
/// compile the SQL at every call, which on a build step's path (a record made, committed,
/// its result saved) cost more than running it.
pub trait Cached {
    fn execute_cached<P: Params>(&self, sql: &str, params: P) -> rusqlite::Result<usize>;
    fn query_row_cached<T, P: Params, F: FnOnce(&Row<'_>) -> rusqlite::Result<T>>(
        &self,
        sql: &str,
        params: P,
        f: F,
    ) -> rusqlite::Result<T>;
}

impl Cached for Connection {
    fn execute_cached<P: Params>(&self, sql: &str, params: P) -> rusqlite::Result<usize> {
        self.prepare_cached(sql)?.execute(params)
    }

    fn query_row_cached<T, P: Params, F: FnOnce(&Row<'_>) -> rusqlite::Result<T>>(
        &self,
        sql: &str,
        params: P,
        f: F,
    ) -> rusqlite::Result<T> {
        self.prepare_cached(sql)?.query_row(params, f)
    }
}

/// Before `conn` (open on `path`) closes: folds a WAL over [`FOLD_WAL_BYTES`] into the
/// database. The next process to open it would read the whole WAL (SQLite rebuilds its
/// index when no other connection has the database open): 4.3 MB after one df11 build,
/// 15% of a cached build's time. A busy database is folded by a later close.
pub fn fold_large_wal(conn: &Connection, path: &Path) {
    let mut wal = path.as_os_str().to_owned();
    wal.push("-wal");
    if std::fs::metadata(&wal).is_ok_and(|m| m.len() > FOLD_WAL_BYTES) {
        let _ = conn.busy_timeout(FOLD_WAIT);
        let _ = conn.query_row("PRAGMA wal_checkpoint(TRUNCATE)", [], |_| Ok(()));
    }
}
