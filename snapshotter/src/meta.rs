//! Snapshot metadata in SQLite (`<root>/snapshots.db`): one row per record, keyed lookups
//! (`cache-dir:<key>`, …), layer digests, and the store-wide settings (backend, xattr
//! namespace, next directory number).
//!
//! Why SQLite: several kiln processes share one root (parallel builds), and SQLite lets them
//! all read and write one database safely with its own file locking, whereas redb or sled
//! admit one process at a time. WAL mode lets readers proceed during a write;
//! `synchronous=NORMAL` keeps every transaction atomic and the database consistent after
//! a crash at any point (a power loss may only roll back the newest transactions, which the
//! record state machine tolerates); `busy_timeout` makes concurrent writers queue instead
//! of failing.
//!
//! A record moves through `creating` → `mutable` → `committed` (or `creating` →
//! `committed` for an imported layer) and `removing` before its row is deleted; every move
//! is one transaction, and the directory work between them is redone or undone by crash
//! recovery (see the crate docs).

use std::cell::RefCell;
use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use kiln_sqlite::Cached;
use rusqlite::{Connection, OptionalExtension, TransactionBehavior, params};

/// Errors from the metadata database.
#[derive(Debug, thiserror::Error)]
pub enum MetaError {
    #[error("snapshot database {path}: {source}")]
    Db {
        path: PathBuf,
        #[source]
        source: rusqlite::Error,
    },
    #[error("snapshot database {path} has an unknown record state {state:?} for {id}")]
    BadState {
        path: PathBuf,
        id: String,
        state: String,
    },
}

/// Where a record is in its life.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum RecordState {
    /// Being made; its maker holds the exclusive lock. Removed by recovery otherwise.
    Creating,
    /// A writable layer.
    Mutable,
    /// An immutable layer.
    Committed,
    /// Being deleted; recovery finishes the job.
    Removing,
}

impl RecordState {
    fn as_str(self) -> &'static str {
        match self {
            RecordState::Creating => "creating",
            RecordState::Mutable => "mutable",
            RecordState::Committed => "committed",
            RecordState::Removing => "removing",
        }
    }

    fn parse(s: &str) -> Option<RecordState> {
        Some(match s {
            "creating" => RecordState::Creating,
            "mutable" => RecordState::Mutable,
            "committed" => RecordState::Committed,
            "removing" => RecordState::Removing,
            _ => return None,
        })
    }
}

/// Digests of an OCI layer a record holds.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct LayerInfo {
    /// sha256 of the uncompressed tar (`sha256:…`).
    pub diff_id: String,
    /// Chain id of this layer on top of its parents.
    pub chain_id: String,
    /// Digest of the compressed blob, when known.
    pub blob_digest: Option<String>,
    /// Size of the compressed blob, when known.
    pub blob_size: Option<u64>,
    /// Media type of the blob, when known.
    pub media_type: Option<String>,
}

/// One record as stored.
#[derive(Clone, Debug)]
pub struct Record {
    pub id: String,
    /// Directory number: the snapshot lives in `snapshots/<n>`.
    pub n: u64,
    pub state: RecordState,
    pub parent: Option<String>,
    pub created_at: SystemTime,
    pub last_used_at: SystemTime,
    pub usage_count: u64,
    /// Cached size of the record's own directory, when computed.
    pub size: Option<u64>,
    /// Keep the record when its last mutable handle is released.
    pub retain: bool,
    pub description: String,
    pub record_type: String,
    pub layer: Option<LayerInfo>,
    /// The record whose directory holds this one's contents (a layer reused in a merge
    /// or diff on another parent chain); `None` when the record has its own.
    pub content: Option<String>,
    /// Boot id under which the record's data was committed without a sync; `None` once
    /// synced. Such data survives a crash of kiln but not a reboot.
    pub unsynced_boot: Option<String>,
}

/// Fields of a new record.
#[derive(Clone, Debug, Default)]
pub(crate) struct NewRecord<'a> {
    pub id: &'a str,
    pub parent: Option<&'a str>,
    pub content: Option<&'a str>,
    pub retain: bool,
    pub description: &'a str,
    pub record_type: &'a str,
}

/// The open database.
#[derive(Debug)]
pub(crate) struct Db {
    conn: Connection,
    path: PathBuf,
    /// Uses of records not written yet (id → last use in ms, number of uses): a cached
    /// build uses every result it hits, and one write transaction per use was most of
    /// its time. Reads see them; they are written together when there are many, when the
    /// store closes, and before a record is deleted. A crash loses only these usage
    /// figures (prune's ordering), never a state change.
    pending_uses: RefCell<HashMap<String, (i64, i64)>>,
}

/// The schema `SCHEMA` and the migrations make (`PRAGMA user_version`); raise it with them.
const SCHEMA_VERSION: i64 = 3;

/// Pending uses written at once beyond this many records.
const MAX_PENDING_USES: usize = 4096;

const SCHEMA: &str = "
CREATE TABLE IF NOT EXISTS settings (key TEXT PRIMARY KEY, value TEXT NOT NULL);
CREATE TABLE IF NOT EXISTS records (
    id TEXT PRIMARY KEY,
    n INTEGER NOT NULL UNIQUE,
    state TEXT NOT NULL,
    parent TEXT,
    created_at INTEGER NOT NULL,
    last_used_at INTEGER NOT NULL,
    usage_count INTEGER NOT NULL DEFAULT 0,
    size INTEGER,
    retain INTEGER NOT NULL DEFAULT 0,
    description TEXT NOT NULL DEFAULT '',
    record_type TEXT NOT NULL DEFAULT 'regular',
    diff_id TEXT,
    chain_id TEXT,
    blob_digest TEXT,
    blob_size INTEGER,
    media_type TEXT,
    unsynced_boot TEXT,
    content TEXT
);
CREATE INDEX IF NOT EXISTS records_parent ON records(parent);
CREATE INDEX IF NOT EXISTS records_chain ON records(chain_id);
-- What every build's opening, end and close look for (half-made, temporary or unsynced
-- records) is found through these rather than by reading every record: usually nothing.
CREATE INDEX IF NOT EXISTS records_state ON records(state, retain);
CREATE INDEX IF NOT EXISTS records_unsynced ON records(unsynced_boot)
    WHERE unsynced_boot IS NOT NULL;
CREATE TABLE IF NOT EXISTS record_keys (
    key TEXT NOT NULL,
    id TEXT NOT NULL,
    PRIMARY KEY (key, id)
);
CREATE INDEX IF NOT EXISTS record_keys_id ON record_keys(id);
CREATE TABLE IF NOT EXISTS record_annotations (
    id TEXT NOT NULL,
    key TEXT NOT NULL,
    value TEXT NOT NULL,
    PRIMARY KEY (id, key)
);
";

const COLUMNS: &str = "id, n, state, parent, created_at, last_used_at, usage_count, size, \
    retain, description, record_type, diff_id, chain_id, blob_digest, blob_size, media_type, \
    unsynced_boot, content";

/// Columns added after a store's first release, with their definitions: added to older
/// databases when they are opened.
const ADDED_COLUMNS: &[(&str, &str)] = &[("content", "TEXT")];

fn millis(t: SystemTime) -> i64 {
    t.duration_since(UNIX_EPOCH)
        .ok()
        .and_then(|d| i64::try_from(d.as_millis()).ok())
        .unwrap_or(0)
}

fn from_millis(ms: i64) -> SystemTime {
    UNIX_EPOCH + Duration::from_millis(u64::try_from(ms).unwrap_or(0))
}

/// Adds the columns an older store lacks, in one transaction (a concurrent opener may be
/// doing the same: the second one finds them present).
fn migrate(conn: &Connection) -> rusqlite::Result<()> {
    let present = |conn: &Connection| -> rusqlite::Result<Vec<String>> {
        let mut stmt = conn.prepare("SELECT name FROM pragma_table_info('records')")?;
        let names = stmt.query_map([], |r| r.get::<_, String>(0))?;
        names.collect()
    };
    if ADDED_COLUMNS
        .iter()
        .all(|(name, _)| present(conn).is_ok_and(|p| p.iter().any(|c| c == name)))
    {
        return Ok(());
    }
    conn.execute_batch("BEGIN IMMEDIATE")?;
    let result = (|| {
        let columns = present(conn)?;
        for (name, definition) in ADDED_COLUMNS {
            if !columns.iter().any(|c| c == name) {
                conn.execute_batch(&format!(
                    "ALTER TABLE records ADD COLUMN {name} {definition}"
                ))?;
            }
        }
        Ok(())
    })();
    conn.execute_batch(if result.is_ok() { "COMMIT" } else { "ROLLBACK" })?;
    result
}

impl Db {
    pub(crate) fn open(path: &Path) -> Result<Db, MetaError> {
        let err = |source| MetaError::Db {
            path: path.to_owned(),
            source,
        };
        let conn = kiln_sqlite::open(path).map_err(err)?;
        // Parsing the schema costs more than a cached build's lookups: only a store of an
        // older schema (or a new one) runs it.
        let version: i64 = conn
            .pragma_query_value(None, "user_version", |r| r.get(0))
            .map_err(err)?;
        if version != SCHEMA_VERSION {
            conn.execute_batch(SCHEMA).map_err(err)?;
            migrate(&conn).map_err(err)?;
            conn.execute_batch("CREATE INDEX IF NOT EXISTS records_content ON records(content);")
                .map_err(err)?;
            conn.pragma_update(None, "user_version", SCHEMA_VERSION)
                .map_err(err)?;
        }
        Ok(Db {
            conn,
            path: path.to_owned(),
            pending_uses: RefCell::new(HashMap::new()),
        })
    }

    /// Writes the pending uses in one transaction.
    pub(crate) fn flush_uses(&self) -> Result<(), MetaError> {
        let pending = std::mem::take(&mut *self.pending_uses.borrow_mut());
        if pending.is_empty() {
            return Ok(());
        }
        let write = || -> rusqlite::Result<()> {
            self.conn.execute_batch("BEGIN IMMEDIATE")?;
            let result = (|| {
                let mut stmt = self.conn.prepare_cached(
                    "UPDATE records SET last_used_at = MAX(last_used_at, ?2), \
                     usage_count = usage_count + ?3 WHERE id = ?1",
                )?;
                for (id, (at, uses)) in &pending {
                    stmt.execute(params![id, at, uses])?;
                }
                Ok(())
            })();
            self.conn
                .execute_batch(if result.is_ok() { "COMMIT" } else { "ROLLBACK" })?;
            result
        };
        write().map_err(self.err())
    }

    fn err(&self) -> impl Fn(rusqlite::Error) -> MetaError + '_ {
        |source| MetaError::Db {
            path: self.path.clone(),
            source,
        }
    }

    pub(crate) fn setting(&self, key: &str) -> Result<Option<String>, MetaError> {
        self.conn
            .query_row_cached("SELECT value FROM settings WHERE key = ?1", [key], |r| {
                r.get(0)
            })
            .optional()
            .map_err(self.err())
    }

    /// The directory number the next record will get.
    pub(crate) fn next_number(&self) -> Result<u64, MetaError> {
        Ok(self
            .setting("next_n")?
            .and_then(|v| v.parse().ok())
            .unwrap_or(1))
    }

    /// Sets `key` to `value`.
    pub(crate) fn set_setting(&self, key: &str, value: &str) -> Result<(), MetaError> {
        self.conn
            .execute_cached(
                "INSERT OR REPLACE INTO settings (key, value) VALUES (?1, ?2)",
                params![key, value],
            )
            .map(drop)
            .map_err(self.err())
    }

    /// Sets `key` to `value` unless it is already set; returns the value in force.
    pub(crate) fn setting_or_insert(&self, key: &str, value: &str) -> Result<String, MetaError> {
        self.conn
            .execute_cached(
                "INSERT OR IGNORE INTO settings (key, value) VALUES (?1, ?2)",
                params![key, value],
            )
            .map_err(self.err())?;
        Ok(self.setting(key)?.unwrap_or_else(|| value.to_owned()))
    }

    /// Runs `f` holding the database's write lock (an IMMEDIATE transaction), so no
    /// [`Db::insert`] of any process runs meanwhile: a lock file or directory
    /// without a record is then a dead creation's, never one still being made (probing
    /// its lock would make that creation fail).
    pub(crate) fn excluding_creations<T, E: From<MetaError>>(
        &self,
        f: impl FnOnce(&Db) -> Result<T, E>,
    ) -> Result<T, E> {
        // Unchecked: `f` reads through `self` while the transaction is open; it rolls back
        // when dropped without a commit (an error, a panic).
        let tx = rusqlite::Transaction::new_unchecked(&self.conn, TransactionBehavior::Immediate)
            .map_err(self.err())?;
        let result = f(self)?;
        tx.commit().map_err(self.err())?;
        Ok(result)
    }

    /// Inserts a record in `state` with a fresh directory number inside one write
    /// transaction, calling `prepare(n)` before the transaction commits: `prepare` takes
    /// the record's lock and makes its directory, so no other process can see the row
    /// without the lock being held. `creating` for a record its caller fills afterwards;
    /// `mutable` for one `prepare` makes whole (no second transaction to move it there).
    pub(crate) fn insert<T, E: From<MetaError>>(
        &mut self,
        new: &NewRecord<'_>,
        state: RecordState,
        prepare: impl FnOnce(u64) -> Result<T, E>,
    ) -> Result<(u64, T), E> {
        let path = self.path.clone();
        let err = |source| MetaError::Db {
            path: path.clone(),
            source,
        };
        let tx = self
            .conn
            .transaction_with_behavior(TransactionBehavior::Immediate)
            .map_err(err)?;
        let next: Option<String> = tx
            .query_row_cached("SELECT value FROM settings WHERE key = 'next_n'", [], |r| {
                r.get(0)
            })
            .optional()
            .map_err(err)?;
        let n: u64 = next.and_then(|v| v.parse().ok()).unwrap_or(1);
        tx.execute_cached(
            "INSERT OR REPLACE INTO settings (key, value) VALUES ('next_n', ?1)",
            [(n + 1).to_string()],
        )
        .map_err(err)?;
        let now = millis(SystemTime::now());
        tx.execute_cached(
            "INSERT INTO records (id, n, state, parent, created_at, last_used_at, retain, \
             description, record_type, content) \
             VALUES (?1, ?2, ?9, ?3, ?4, ?4, ?5, ?6, ?7, ?8)",
            params![
                new.id,
                i64::try_from(n).unwrap_or(i64::MAX),
                new.parent,
                now,
                new.retain,
                new.description,
                new.record_type,
                new.content,
                state.as_str()
            ],
        )
        .map_err(err)?;
        let prepared = prepare(n)?;
        tx.commit().map_err(err)?;
        Ok((n, prepared))
    }

    fn row(r: &rusqlite::Row<'_>) -> rusqlite::Result<(Record, String)> {
        let state: String = r.get(2)?;
        let diff_id: Option<String> = r.get(11)?;
        let chain_id: Option<String> = r.get(12)?;
        let layer = match (diff_id, chain_id) {
            (Some(diff_id), Some(chain_id)) => Some(LayerInfo {
                diff_id,
                chain_id,
                blob_digest: r.get(13)?,
                blob_size: r
                    .get::<_, Option<i64>>(14)?
                    .and_then(|s| u64::try_from(s).ok()),
                media_type: r.get(15)?,
            }),
            _ => None,
        };
        Ok((
            Record {
                id: r.get(0)?,
                n: u64::try_from(r.get::<_, i64>(1)?).unwrap_or(0),
                state: RecordState::Creating,
                parent: r.get(3)?,
                created_at: from_millis(r.get(4)?),
                last_used_at: from_millis(r.get(5)?),
                usage_count: u64::try_from(r.get::<_, i64>(6)?).unwrap_or(0),
                size: r
                    .get::<_, Option<i64>>(7)?
                    .and_then(|s| u64::try_from(s).ok()),
                retain: r.get(8)?,
                description: r.get(9)?,
                record_type: r.get(10)?,
                layer,
                unsynced_boot: r.get(16)?,
                content: r.get(17)?,
            },
            state,
        ))
    }

    fn finish(&self, (mut record, state): (Record, String)) -> Result<Record, MetaError> {
        record.state = RecordState::parse(&state).ok_or_else(|| MetaError::BadState {
            path: self.path.clone(),
            id: record.id.clone(),
            state,
        })?;
        if let Some((at, uses)) = self.pending_uses.borrow().get(&record.id) {
            record.last_used_at = record.last_used_at.max(from_millis(*at));
            record.usage_count += u64::try_from(*uses).unwrap_or(0);
        }
        Ok(record)
    }

    pub(crate) fn get(&self, id: &str) -> Result<Option<Record>, MetaError> {
        let row = self
            .conn
            .prepare_cached(&format!("SELECT {COLUMNS} FROM records WHERE id = ?1"))
            .and_then(|mut stmt| stmt.query_row([id], Self::row).optional())
            .map_err(self.err())?;
        row.map(|r| self.finish(r)).transpose()
    }

    /// `id` and every record it mounts on (its parents and content records, transitively),
    /// by id, in one read.
    pub(crate) fn lineage(&self, id: &str) -> Result<HashMap<String, Record>, MetaError> {
        let records = self.query(
            &format!(
                "WITH RECURSIVE lineage(id) AS (SELECT ?1 \
                 UNION SELECT r.parent FROM records r JOIN lineage l ON r.id = l.id \
                 WHERE r.parent IS NOT NULL \
                 UNION SELECT r.content FROM records r JOIN lineage l ON r.id = l.id \
                 WHERE r.content IS NOT NULL) \
                 SELECT {COLUMNS} FROM records WHERE id IN lineage"
            ),
            Some(id),
        )?;
        Ok(records.into_iter().map(|r| (r.id.clone(), r)).collect())
    }

    /// The directory numbers of all records.
    pub(crate) fn numbers(&self) -> Result<std::collections::HashSet<u64>, MetaError> {
        let mut stmt = self
            .conn
            .prepare_cached("SELECT n FROM records")
            .map_err(self.err())?;
        let rows = stmt
            .query_map([], |r| r.get::<_, i64>(0))
            .map_err(self.err())?;
        let mut out = std::collections::HashSet::new();
        for n in rows {
            out.insert(u64::try_from(n.map_err(self.err())?).unwrap_or(0));
        }
        Ok(out)
    }

    pub(crate) fn get_by_n(&self, n: u64) -> Result<Option<Record>, MetaError> {
        let row = self
            .conn
            .query_row_cached(
                &format!("SELECT {COLUMNS} FROM records WHERE n = ?1"),
                [i64::try_from(n).unwrap_or(i64::MAX)],
                Self::row,
            )
            .optional()
            .map_err(self.err())?;
        row.map(|r| self.finish(r)).transpose()
    }

    fn query(&self, sql: &str, arg: Option<&str>) -> Result<Vec<Record>, MetaError> {
        let mut stmt = self.conn.prepare_cached(sql).map_err(self.err())?;
        let rows = match arg {
            Some(a) => stmt.query_map([a], Self::row),
            None => stmt.query_map([], Self::row),
        }
        .map_err(self.err())?;
        let mut out = Vec::new();
        for row in rows {
            out.push(self.finish(row.map_err(self.err())?)?);
        }
        Ok(out)
    }

    pub(crate) fn all(&self) -> Result<Vec<Record>, MetaError> {
        self.query(&format!("SELECT {COLUMNS} FROM records ORDER BY n"), None)
    }

    /// Committed records nobody asked to keep (temporary results), filtered in SQL: what a
    /// build's end looks at, whatever the store's size.
    pub(crate) fn unretained(&self) -> Result<Vec<Record>, MetaError> {
        self.query(
            &format!(
                "SELECT {COLUMNS} FROM records WHERE state = 'committed' AND retain = 0 ORDER BY n"
            ),
            None,
        )
    }

    /// The records a store opening must look at (what [`all`](Db::all) would give,
    /// filtered in SQL): half made or half removed, mutable and not retained, or committed
    /// during a boot other than `boot_id` and never synced. Usually none, whatever the
    /// store's size.
    pub(crate) fn needing_recovery(&self, boot_id: &str) -> Result<Vec<Record>, MetaError> {
        // Sorted here: with `ORDER BY n` SQLite walks the whole table in `n` order instead
        // of looking the few rows up in `records_state` and `records_unsynced`.
        let mut records = self.query(
            &format!(
                "SELECT {COLUMNS} FROM records WHERE state IN ('creating', 'removing') \
                 OR (state = 'mutable' AND retain = 0) \
                 OR (unsynced_boot IS NOT NULL AND unsynced_boot != ?1)"
            ),
            Some(boot_id),
        )?;
        records.sort_by_key(|r| r.n);
        Ok(records)
    }

    /// The records that depend on `id`: built on it (its children) or reusing its
    /// directory; while there are any, `id` must stay.
    pub(crate) fn children(&self, id: &str) -> Result<Vec<Record>, MetaError> {
        self.query(
            &format!("SELECT {COLUMNS} FROM records WHERE parent = ?1 OR content = ?1 ORDER BY n"),
            Some(id),
        )
    }

    pub(crate) fn by_chain_id(&self, chain_id: &str) -> Result<Vec<Record>, MetaError> {
        self.query(
            &format!(
                "SELECT {COLUMNS} FROM records WHERE chain_id = ?1 AND state = 'committed' \
                 ORDER BY n"
            ),
            Some(chain_id),
        )
    }

    pub(crate) fn by_key(&self, key: &str) -> Result<Vec<Record>, MetaError> {
        self.query(
            &format!(
                "SELECT {} FROM records r JOIN record_keys k ON k.id = r.id WHERE k.key = ?1 \
                 ORDER BY r.n",
                COLUMNS
                    .split(", ")
                    .map(|c| format!("r.{c}"))
                    .collect::<Vec<_>>()
                    .join(", ")
            ),
            Some(key),
        )
    }

    pub(crate) fn keys(&self, id: &str) -> Result<Vec<String>, MetaError> {
        let mut stmt = self
            .conn
            .prepare_cached("SELECT key FROM record_keys WHERE id = ?1 ORDER BY key")
            .map_err(self.err())?;
        let rows = stmt.query_map([id], |r| r.get(0)).map_err(self.err())?;
        rows.collect::<Result<Vec<String>, _>>().map_err(self.err())
    }

    pub(crate) fn add_key(&self, id: &str, key: &str) -> Result<(), MetaError> {
        self.conn
            .execute_cached(
                "INSERT OR IGNORE INTO record_keys (key, id) VALUES (?1, ?2)",
                params![key, id],
            )
            .map(drop)
            .map_err(self.err())
    }

    pub(crate) fn remove_key(&self, id: &str, key: &str) -> Result<(), MetaError> {
        self.conn
            .execute_cached(
                "DELETE FROM record_keys WHERE key = ?1 AND id = ?2",
                params![key, id],
            )
            .map(drop)
            .map_err(self.err())
    }

    /// Moves `id` from state `from` to `to`; returns whether the row was in state `from`.
    pub(crate) fn transition(
        &self,
        id: &str,
        from: RecordState,
        to: RecordState,
        unsynced_boot: Option<&str>,
    ) -> Result<bool, MetaError> {
        let changed = self
            .conn
            .execute_cached(
                "UPDATE records SET state = ?3, unsynced_boot = COALESCE(?4, unsynced_boot) \
                 WHERE id = ?1 AND state = ?2",
                params![id, from.as_str(), to.as_str(), unsynced_boot],
            )
            .map_err(self.err())?;
        Ok(changed == 1)
    }

    /// Marks `id` as being removed (from any state).
    pub(crate) fn mark_removing(&self, id: &str) -> Result<(), MetaError> {
        self.conn
            .execute_cached("UPDATE records SET state = 'removing' WHERE id = ?1", [id])
            .map(drop)
            .map_err(self.err())
    }

    pub(crate) fn delete(&mut self, id: &str) -> Result<(), MetaError> {
        let path = self.path.clone();
        let err = |source| MetaError::Db {
            path: path.clone(),
            source,
        };
        self.pending_uses.borrow_mut().remove(id);
        let tx = self.conn.transaction().map_err(err)?;
        tx.execute_cached("DELETE FROM record_keys WHERE id = ?1", [id])
            .map_err(err)?;
        tx.execute_cached("DELETE FROM record_annotations WHERE id = ?1", [id])
            .map_err(err)?;
        tx.execute_cached("DELETE FROM records WHERE id = ?1", [id])
            .map_err(err)?;
        tx.commit().map_err(err)
    }

    pub(crate) fn touch(&self, id: &str, count_use: bool) -> Result<(), MetaError> {
        let full = {
            let mut pending = self.pending_uses.borrow_mut();
            let entry = pending.entry(id.to_owned()).or_insert((0, 0));
            entry.0 = entry.0.max(millis(SystemTime::now()));
            entry.1 += i64::from(count_use);
            pending.len() >= MAX_PENDING_USES
        };
        if full { self.flush_uses() } else { Ok(()) }
    }

    pub(crate) fn annotation(&self, id: &str, key: &str) -> Result<Option<String>, MetaError> {
        self.conn
            .prepare_cached("SELECT value FROM record_annotations WHERE id = ?1 AND key = ?2")
            .and_then(|mut stmt| stmt.query_row(params![id, key], |r| r.get(0)).optional())
            .map_err(self.err())
    }

    pub(crate) fn set_annotation(&self, id: &str, key: &str, value: &str) -> Result<(), MetaError> {
        self.conn
            .execute_cached(
                "INSERT OR REPLACE INTO record_annotations (id, key, value) VALUES (?1, ?2, ?3)",
                params![id, key, value],
            )
            .map(drop)
            .map_err(self.err())
    }

    pub(crate) fn set_retain(&self, id: &str, retain: bool) -> Result<(), MetaError> {
        // Unchanged rows are not written: a cached build marks every result it uses.
        self.conn
            .prepare_cached("UPDATE records SET retain = ?2 WHERE id = ?1 AND retain != ?2")
            .and_then(|mut stmt| stmt.execute(params![id, retain]))
            .map(drop)
            .map_err(self.err())
    }

    pub(crate) fn set_size(&self, id: &str, size: Option<u64>) -> Result<(), MetaError> {
        self.conn
            .execute_cached(
                "UPDATE records SET size = ?2 WHERE id = ?1",
                params![id, size.and_then(|s| i64::try_from(s).ok())],
            )
            .map(drop)
            .map_err(self.err())
    }

    pub(crate) fn set_layer(&self, id: &str, layer: &LayerInfo) -> Result<(), MetaError> {
        self.conn
            .execute_cached(
                "UPDATE records SET diff_id = ?2, chain_id = ?3, blob_digest = ?4, \
                 blob_size = ?5, media_type = ?6 WHERE id = ?1",
                params![
                    id,
                    layer.diff_id,
                    layer.chain_id,
                    layer.blob_digest,
                    layer.blob_size.and_then(|s| i64::try_from(s).ok()),
                    layer.media_type
                ],
            )
            .map(drop)
            .map_err(self.err())
    }

    /// Clears the unsynced marker of every record committed under `boot`.
    pub(crate) fn mark_synced(&self, boot: &str) -> Result<(), MetaError> {
        self.conn
            .execute_cached(
                "UPDATE records SET unsynced_boot = NULL WHERE unsynced_boot = ?1",
                [boot],
            )
            .map(drop)
            .map_err(self.err())
    }

    pub(crate) fn has_unsynced(&self) -> Result<bool, MetaError> {
        self.conn
            .query_row_cached(
                "SELECT EXISTS(SELECT 1 FROM records WHERE unsynced_boot IS NOT NULL)",
                [],
                |r| r.get(0),
            )
            .map_err(self.err())
    }

    /// `PRAGMA quick_check`: `None` when the database file is sound.
    pub(crate) fn integrity(&self) -> Result<Option<String>, MetaError> {
        let result: String = self
            .conn
            .query_row("PRAGMA quick_check", [], |r| r.get(0))
            .map_err(self.err())?;
        Ok((result != "ok").then_some(result))
    }
}

impl Drop for Db {
    fn drop(&mut self) {
        if let Err(e) = self.flush_uses() {
            tracing::warn!("recording snapshot uses: {e}");
        }
        kiln_sqlite::fold_large_wal(&self.conn, &self.path);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn stores_made_before_reused_layers_gain_the_content_column() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("snapshots.db");
        {
            // The records table as the first release created it.
            let old_schema = SCHEMA.replace(",\n    content TEXT", "");
            assert!(!old_schema.contains("content"));
            let conn = Connection::open(&path).unwrap();
            conn.execute_batch(&old_schema).unwrap();
            conn.execute(
                "INSERT INTO records (id, n, state, created_at, last_used_at) \
                 VALUES ('old', 1, 'committed', 0, 0)",
                [],
            )
            .unwrap();
        }
        let db = Db::open(&path).unwrap();
        let old = db.get("old").unwrap().unwrap();
        assert_eq!(old.content, None);
        assert_eq!(old.state, RecordState::Committed);
        // Opening again finds the column present.
        drop(db);
        let db = Db::open(&path).unwrap();
        assert!(db.children("old").unwrap().is_empty());
    }

    #[test]
    fn an_opening_store_looks_only_at_records_that_need_recovery() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("snapshots.db");
        let conn = Connection::open(&path).unwrap();
        conn.execute_batch(SCHEMA).unwrap();
        for (n, id, state, retain, unsynced) in [
            (1, "done", "committed", 0, None),
            (2, "creating", "creating", 0, None),
            (3, "removing", "removing", 1, None),
            (4, "scratch", "mutable", 0, None),
            (5, "kept", "mutable", 1, None),
            (6, "this-boot", "committed", 0, Some("boot-a")),
            (7, "lost-boot", "committed", 0, Some("boot-b")),
        ] {
            conn.execute(
                "INSERT INTO records (id, n, state, created_at, last_used_at, retain, \
                 unsynced_boot) VALUES (?1, ?2, ?3, 0, 0, ?4, ?5)",
                rusqlite::params![id, n, state, retain, unsynced],
            )
            .unwrap();
        }
        drop(conn);
        let db = Db::open(&path).unwrap();
        let ids: Vec<String> = db
            .needing_recovery("boot-a")
            .unwrap()
            .into_iter()
            .map(|r| r.id)
            .collect();
        assert_eq!(ids, ["creating", "removing", "scratch", "lost-boot"]);
    }

    /// SQLite VM instructions that what a build does at the store's opening, end and
    /// close (`needing_recovery`, `unretained`, `has_unsynced`, `mark_synced`) runs in a
    /// store of schema 2 (before their indexes) holding `settled` committed, retained and
    /// synced records besides one record each of the kinds they look for.
    fn bookkeeping_ops(settled: i64) -> u64 {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("snapshots.db");
        let conn = Connection::open(&path).unwrap();
        conn.execute_batch(SCHEMA).unwrap();
        conn.execute_batch(
            "DROP INDEX records_state; DROP INDEX records_unsynced; PRAGMA user_version = 2;",
        )
        .unwrap();
        let mut insert = conn
            .prepare(
                "INSERT INTO records (id, n, state, created_at, last_used_at, retain, \
                 unsynced_boot) VALUES (?1, ?2, ?3, 0, 0, ?4, ?5)",
            )
            .unwrap();
        for n in 0..settled {
            let row = rusqlite::params![format!("settled-{n}"), n, "committed", 1, None::<&str>];
            insert.execute(row).unwrap();
        }
        for (i, (state, retain, unsynced)) in [
            ("creating", 0, None),
            ("committed", 0, None),
            ("committed", 1, Some("boot-b")),
        ]
        .into_iter()
        .enumerate()
        {
            let n = settled + i64::try_from(i).unwrap();
            let row = rusqlite::params![format!("odd-{i}"), n, state, retain, unsynced];
            insert.execute(row).unwrap();
        }
        drop(insert);
        drop(conn);
        let db = Db::open(&path).unwrap();
        let ops = std::sync::Arc::new(std::sync::atomic::AtomicU64::new(0));
        let counter = ops.clone();
        db.conn
            .progress_handler(
                1,
                Some(move || {
                    counter.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                    false
                }),
            )
            .unwrap();
        assert_eq!(db.needing_recovery("boot-a").unwrap().len(), 2);
        assert_eq!(db.unretained().unwrap().len(), 1);
        assert!(db.has_unsynced().unwrap());
        db.mark_synced("boot-b").unwrap();
        assert!(!db.has_unsynced().unwrap());
        ops.load(std::sync::atomic::Ordering::Relaxed)
    }

    #[test]
    fn a_build_s_bookkeeping_reads_only_the_records_it_finds() {
        // A full scan runs ≥ 10 instructions per record: 50 000 more for 5000 records.
        let (small, large) = (bookkeeping_ops(10), bookkeeping_ops(5000));
        assert!(
            large < small + 500,
            "{small} instructions with 10 settled records, {large} with 5000"
        );
    }

    fn db_with_record(path: &Path) -> Db {
        let conn = Connection::open(path).unwrap();
        conn.execute_batch(SCHEMA).unwrap();
        conn.execute(
            "INSERT INTO records (id, n, state, created_at, last_used_at) \
             VALUES ('r', 1, 'committed', 0, 0)",
            [],
        )
        .unwrap();
        drop(conn);
        Db::open(path).unwrap()
    }

    fn stored_uses(path: &Path) -> (i64, i64) {
        Connection::open(path)
            .unwrap()
            .query_row(
                "SELECT last_used_at, usage_count FROM records WHERE id = 'r'",
                [],
                |r| Ok((r.get(0)?, r.get(1)?)),
            )
            .unwrap()
    }

    #[test]
    fn a_large_wal_is_folded_into_the_database_at_close() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("snapshots.db");
        let wal = dir.path().join("snapshots.db-wal");
        let db = db_with_record(&path);
        for i in 0..8 {
            db.set_annotation("r", &format!("k{i}"), &"x".repeat(64 << 10))
                .unwrap();
        }
        assert!(std::fs::metadata(&wal).unwrap().len() > kiln_sqlite::FOLD_WAL_BYTES);
        drop(db);
        assert_eq!(std::fs::metadata(&wal).map(|m| m.len()).unwrap_or(0), 0);
        let db = Db::open(&path).unwrap();
        assert_eq!(
            db.annotation("r", "k7").unwrap().map(|v| v.len()),
            Some(64 << 10)
        );
    }

    #[test]
    fn uses_are_seen_at_once_and_written_together_when_the_store_closes() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("snapshots.db");
        let db = db_with_record(&path);
        db.touch("r", true).unwrap();
        db.touch("r", true).unwrap();
        db.touch("r", false).unwrap();
        let seen = db.get("r").unwrap().unwrap();
        assert_eq!(seen.usage_count, 2);
        assert!(seen.last_used_at > UNIX_EPOCH);
        assert_eq!(db.all().unwrap()[0].usage_count, 2, "listings see them too");
        assert_eq!(stored_uses(&path), (0, 0), "not written per use");
        drop(db);
        let (last_used, count) = stored_uses(&path);
        assert_eq!(count, 2);
        assert!(last_used > 0);
    }

    #[test]
    fn annotations_persist_and_go_with_their_record() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("snapshots.db");
        let db = db_with_record(&path);
        assert_eq!(db.annotation("r", "k").unwrap(), None);
        db.set_annotation("r", "k", "v1").unwrap();
        db.set_annotation("r", "k", "v2").unwrap();
        drop(db);
        let mut db = Db::open(&path).unwrap();
        assert_eq!(db.annotation("r", "k").unwrap().as_deref(), Some("v2"));
        db.touch("r", true).unwrap();
        db.delete("r").unwrap();
        assert_eq!(db.annotation("r", "k").unwrap(), None);
        drop(db);
        let rows: i64 = Connection::open(&path)
            .unwrap()
            .query_row("SELECT count(*) FROM record_annotations", [], |r| r.get(0))
            .unwrap();
        assert_eq!(rows, 0);
    }
}
