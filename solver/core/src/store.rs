//! The persistent cache store: links between cache keys and the results saved under
//! keys (BuildKit's `_links`/`_backlinks`/`_result`/`_byresult` buckets), in
//! `<root>/cache.db`.
//!
//! SQLite (bundled through `rusqlite`) rather than redb or hand-rolled files: several kiln
//! processes may share one `--root`, and redb lets only one process open a database,
//! while SQLite coordinates readers and writers across processes with its own locks
//! (`busy_timeout` makes a writer wait instead of failing). WAL mode with
//! `synchronous=NORMAL` keeps every transaction atomic and the file consistent across a
//! process crash (kill -9) or power loss: a crash can lose only the last transactions on
//! power loss, never tear one. Each save (key, links, result) is one `IMMEDIATE`
//! transaction, so a reader sees all of it or none.
//!
//! Tables: `keys(id)`; `links(source, input, output, digest, selector, target)` with an
//! index on `target` (backlinks); `results(key, result_id, created_at)` with an index on
//! `result_id` (by-result).

use std::path::{Path, PathBuf};
use std::sync::Mutex;
use std::time::{SystemTime, UNIX_EPOCH};

use kiln_sqlite::Cached;
use rusqlite::{Connection, OptionalExtension, TransactionBehavior, params};

use kiln_proto::gojson::ObjectWriter;

/// A stored edge `source --link--> target`: which input, output, CacheMap digest and
/// selector connect a dependency key to a key.
#[derive(Clone, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct Link {
    pub input: i64,
    pub output: i64,
    pub digest: String,
    pub selector: String,
}

impl Link {
    /// BuildKit's link key: Go JSON of `{Input, Output, Digest, Selector}`, all omitempty.
    pub fn go_json(&self) -> String {
        let mut out = Vec::new();
        ObjectWriter::new(&mut out)
            .int("Input", self.input)
            .int("Output", self.output)
            .string("Digest", &self.digest)
            .string("Selector", &self.selector)
            .finish();
        String::from_utf8_lossy(&out).into_owned()
    }
}

/// File name of the store under `--root`.
pub const STORE_FILE: &str = "cache.db";
const SCHEMA_VERSION: i64 = 1;

/// Errors from the cache store.
#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    #[error("cache store {path}: {source}")]
    Sqlite {
        path: PathBuf,
        #[source]
        source: rusqlite::Error,
    },
    #[error("cache store {path}: creating its directory: {source}")]
    Dir {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error(
        "cache store {path} has schema version {found}, newer than this kiln ({SCHEMA_VERSION})"
    )]
    NewerSchema { path: PathBuf, found: i64 },
    #[error("cache store {path} is damaged: {what}")]
    Damaged { path: PathBuf, what: String },
    #[error("cache store {path}: lock poisoned by a panic")]
    Poisoned { path: PathBuf },
}

/// One result saved under a key.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct CacheResult {
    pub id: String,
    /// Unix time in nanoseconds.
    pub created_at: i64,
}

impl CacheResult {
    /// A result created now.
    pub fn now(id: impl Into<String>) -> Self {
        let nanos = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map(|d| i64::try_from(d.as_nanos()).unwrap_or(i64::MAX))
            .unwrap_or(0);
        CacheResult {
            id: id.into(),
            created_at: nanos,
        }
    }
}

impl Drop for Store {
    /// Folds a large WAL into the database ([`kiln_sqlite::fold_large_wal`]).
    fn drop(&mut self) {
        if let Ok(conn) = self.conn.get_mut() {
            kiln_sqlite::fold_large_wal(conn, &self.path);
        }
    }
}

/// Counts from [`Store::check`].
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub struct StoreStats {
    pub keys: u64,
    pub links: u64,
    pub results: u64,
}

/// The cache store. Cheap to share behind an `Arc`; calls block briefly (use
/// `spawn_blocking` from async code).
#[derive(Debug)]
pub struct Store {
    path: PathBuf,
    conn: Mutex<Connection>,
}

impl Store {
    /// Opens (creating if needed) `<root>/cache.db`.
    pub fn open(root: &Path) -> Result<Self, StoreError> {
        std::fs::create_dir_all(root).map_err(|source| StoreError::Dir {
            path: root.to_owned(),
            source,
        })?;
        Self::open_file(&root.join(STORE_FILE))
    }

    /// Opens (creating if needed) the store at `path`.
    pub fn open_file(path: &Path) -> Result<Self, StoreError> {
        let err = |source| StoreError::Sqlite {
            path: path.to_owned(),
            source,
        };
        let mut conn = kiln_sqlite::open(path).map_err(err)?;
        // The schema is current in all but a new or older store: no write lock then.
        let current: i64 = conn
            .pragma_query_value(None, "user_version", |r| r.get(0))
            .map_err(err)?;
        if current == SCHEMA_VERSION {
            return Ok(Store {
                path: path.to_owned(),
                conn: Mutex::new(conn),
            });
        }
        let tx = conn
            .transaction_with_behavior(TransactionBehavior::Immediate)
            .map_err(err)?;
        let version: i64 = tx
            .pragma_query_value(None, "user_version", |r| r.get(0))
            .map_err(err)?;
        if version > SCHEMA_VERSION {
            return Err(StoreError::NewerSchema {
                path: path.to_owned(),
                found: version,
            });
        }
        if version < SCHEMA_VERSION {
            tx.execute_batch(
                "CREATE TABLE IF NOT EXISTS keys(id TEXT PRIMARY KEY NOT NULL) WITHOUT ROWID;
                 CREATE TABLE IF NOT EXISTS links(
                     source TEXT NOT NULL, input INTEGER NOT NULL, output INTEGER NOT NULL,
                     digest TEXT NOT NULL, selector TEXT NOT NULL, target TEXT NOT NULL,
                     PRIMARY KEY(source, input, output, digest, selector, target)
                 ) WITHOUT ROWID;
                 CREATE INDEX IF NOT EXISTS links_by_target ON links(target);
                 CREATE TABLE IF NOT EXISTS results(
                     key TEXT NOT NULL, result_id TEXT NOT NULL, created_at INTEGER NOT NULL,
                     PRIMARY KEY(key, result_id)
                 ) WITHOUT ROWID;
                 CREATE INDEX IF NOT EXISTS results_by_id ON results(result_id);",
            )
            .map_err(err)?;
            tx.pragma_update(None, "user_version", SCHEMA_VERSION)
                .map_err(err)?;
        }
        tx.commit().map_err(err)?;
        Ok(Store {
            path: path.to_owned(),
            conn: Mutex::new(conn),
        })
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    fn with<T>(
        &self,
        f: impl FnOnce(&mut Connection) -> rusqlite::Result<T>,
    ) -> Result<T, StoreError> {
        let mut conn = self.conn.lock().map_err(|_| StoreError::Poisoned {
            path: self.path.clone(),
        })?;
        f(&mut conn).map_err(|source| StoreError::Sqlite {
            path: self.path.clone(),
            source,
        })
    }

    /// Whether `key` is known (has results or links).
    pub fn exists(&self, key: &str) -> Result<bool, StoreError> {
        self.with(|c| {
            c.prepare_cached("SELECT 1 FROM keys WHERE id = ?1")?
                .query_row([key], |_| Ok(()))
                .optional()
                .map(|r| r.is_some())
        })
    }

    /// Targets of `link` from `source`.
    pub fn targets(&self, source: &str, link: &Link) -> Result<Vec<String>, StoreError> {
        self.with(|c| {
            let mut stmt = c.prepare_cached(
                "SELECT target FROM links WHERE source = ?1 AND input = ?2 AND output = ?3
                 AND digest = ?4 AND selector = ?5 ORDER BY target",
            )?;
            let rows = stmt.query_map(
                params![source, link.input, link.output, link.digest, link.selector],
                |r| r.get(0),
            )?;
            rows.collect()
        })
    }

    /// Results saved under `key`, newest first.
    pub fn results(&self, key: &str) -> Result<Vec<CacheResult>, StoreError> {
        self.with(|c| {
            let mut stmt = c.prepare_cached(
                "SELECT result_id, created_at FROM results WHERE key = ?1
                 ORDER BY created_at DESC, result_id",
            )?;
            let rows = stmt.query_map([key], |r| {
                Ok(CacheResult {
                    id: r.get(0)?,
                    created_at: r.get(1)?,
                })
            })?;
            rows.collect()
        })
    }

    /// Records `links` (each `(source, link)` pointing at `key`) and, if given, a result
    /// under `key`, atomically.
    pub fn save(
        &self,
        key: &str,
        links: &[(String, Link)],
        result: Option<&CacheResult>,
    ) -> Result<(), StoreError> {
        self.with(|c| {
            let tx = c.transaction_with_behavior(TransactionBehavior::Immediate)?;
            {
                let mut add_key =
                    tx.prepare_cached("INSERT OR IGNORE INTO keys(id) VALUES (?1)")?;
                let mut add_link = tx.prepare_cached(
                    "INSERT OR IGNORE INTO links(source, input, output, digest, selector, target)
                     VALUES (?1, ?2, ?3, ?4, ?5, ?6)",
                )?;
                add_key.execute([key])?;
                for (source, link) in links {
                    add_key.execute([source])?;
                    add_link.execute(params![
                        source,
                        link.input,
                        link.output,
                        link.digest,
                        link.selector,
                        key
                    ])?;
                }
                if let Some(result) = result {
                    tx.execute_cached(
                        "INSERT OR REPLACE INTO results(key, result_id, created_at)
                         VALUES (?1, ?2, ?3)",
                        params![key, result.id, result.created_at],
                    )?;
                }
            }
            tx.commit()
        })
    }

    /// Drops one result record (its ref is gone) and every key left with neither results
    /// nor outgoing links, walking up through the keys that linked to it.
    pub fn remove_result(&self, key: &str, result_id: &str) -> Result<(), StoreError> {
        self.with(|c| {
            let tx = c.transaction_with_behavior(TransactionBehavior::Immediate)?;
            tx.execute_cached(
                "DELETE FROM results WHERE key = ?1 AND result_id = ?2",
                params![key, result_id],
            )?;
            let mut pending = vec![key.to_owned()];
            while let Some(k) = pending.pop() {
                let busy: bool = tx.query_row_cached(
                    "SELECT EXISTS(SELECT 1 FROM results WHERE key = ?1)
                         OR EXISTS(SELECT 1 FROM links WHERE source = ?1)",
                    [&k],
                    |r| r.get(0),
                )?;
                if busy {
                    continue;
                }
                let parents: Vec<String> = {
                    let mut stmt =
                        tx.prepare_cached("SELECT DISTINCT source FROM links WHERE target = ?1")?;
                    let rows = stmt.query_map([&k], |r| r.get(0))?;
                    rows.collect::<rusqlite::Result<_>>()?
                };
                tx.execute_cached("DELETE FROM links WHERE target = ?1", [&k])?;
                tx.execute_cached("DELETE FROM keys WHERE id = ?1", [&k])?;
                pending.extend(parents);
            }
            tx.commit()
        })
    }

    /// Checks the file (SQLite's integrity check) and the store's own invariants: every
    /// key a link or result names is recorded.
    pub fn check(&self) -> Result<StoreStats, StoreError> {
        let damaged = |what: String| StoreError::Damaged {
            path: self.path.clone(),
            what,
        };
        let integrity: Vec<String> = self.with(|c| {
            let mut stmt = c.prepare("PRAGMA integrity_check")?;
            let rows = stmt.query_map([], |r| r.get(0))?;
            rows.collect()
        })?;
        if integrity != ["ok"] {
            return Err(damaged(integrity.join("; ")));
        }
        let dangling: i64 = self.with(|c| {
            c.query_row_cached(
                "SELECT (SELECT count(*) FROM links WHERE source NOT IN (SELECT id FROM keys)
                                                   OR target NOT IN (SELECT id FROM keys))
                      + (SELECT count(*) FROM results WHERE key NOT IN (SELECT id FROM keys))",
                [],
                |r| r.get(0),
            )
        })?;
        if dangling != 0 {
            return Err(damaged(format!(
                "{dangling} links or results name unknown keys"
            )));
        }
        self.with(|c| {
            c.query_row_cached(
                "SELECT (SELECT count(*) FROM keys), (SELECT count(*) FROM links),
                        (SELECT count(*) FROM results)",
                [],
                |r| {
                    Ok(StoreStats {
                        keys: r.get::<_, i64>(0)?.unsigned_abs(),
                        links: r.get::<_, i64>(1)?.unsigned_abs(),
                        results: r.get::<_, i64>(2)?.unsigned_abs(),
                    })
                },
            )
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn link_json_is_go_omitempty() {
        let link = Link {
            input: 0,
            output: 1,
            digest: "sha256:6b64".into(),
            selector: "sha256:6911".into(),
        };
        assert_eq!(
            link.go_json(),
            r#"{"Output":1,"Digest":"sha256:6b64","Selector":"sha256:6911"}"#
        );
        let plain = Link {
            input: 0,
            output: 0,
            digest: "sha256:x".into(),
            selector: String::new(),
        };
        assert_eq!(plain.go_json(), r#"{"Digest":"sha256:x"}"#);
    }

    fn link(input: i64, digest: &str) -> Link {
        Link {
            input,
            output: 0,
            digest: digest.into(),
            selector: String::new(),
        }
    }

    #[test]
    fn saves_links_and_results_and_survives_reopen() {
        let dir = tempfile::tempdir().unwrap();
        {
            let store = Store::open(dir.path()).unwrap();
            store
                .save(
                    "root",
                    &[],
                    Some(&CacheResult {
                        id: "r0".into(),
                        created_at: 1,
                    }),
                )
                .unwrap();
            store
                .save(
                    "k1",
                    &[("root".to_owned(), link(0, "d"))],
                    Some(&CacheResult {
                        id: "r1".into(),
                        created_at: 2,
                    }),
                )
                .unwrap();
            store
                .save(
                    "k1",
                    &[],
                    Some(&CacheResult {
                        id: "r2".into(),
                        created_at: 3,
                    }),
                )
                .unwrap();
        }
        let store = Store::open(dir.path()).unwrap();
        assert_eq!(store.targets("root", &link(0, "d")).unwrap(), ["k1"]);
        assert!(store.targets("root", &link(1, "d")).unwrap().is_empty());
        let ids: Vec<String> = store
            .results("k1")
            .unwrap()
            .into_iter()
            .map(|r| r.id)
            .collect();
        assert_eq!(ids, ["r2", "r1"], "newest first");
        assert_eq!(
            store.check().unwrap(),
            StoreStats {
                keys: 2,
                links: 1,
                results: 3
            }
        );
    }

    #[test]
    fn removing_the_last_result_prunes_empty_keys_upwards() {
        let dir = tempfile::tempdir().unwrap();
        let store = Store::open(dir.path()).unwrap();
        store.save("a", &[], None).unwrap();
        store
            .save("b", &[("a".to_owned(), link(0, "d1"))], None)
            .unwrap();
        store
            .save(
                "c",
                &[("b".to_owned(), link(0, "d2"))],
                Some(&CacheResult {
                    id: "rc".into(),
                    created_at: 1,
                }),
            )
            .unwrap();
        store.remove_result("c", "rc").unwrap();
        assert!(!store.exists("c").unwrap());
        assert!(!store.exists("b").unwrap());
        assert!(!store.exists("a").unwrap());
        assert_eq!(store.check().unwrap(), StoreStats::default());
    }

    #[test]
    fn a_large_wal_is_folded_into_the_database_at_close() {
        let dir = tempfile::tempdir().unwrap();
        let wal = dir.path().join(format!("{STORE_FILE}-wal"));
        let store = Store::open(dir.path()).unwrap();
        store
            .save("small", &[], Some(&CacheResult::now("r")))
            .unwrap();
        drop(store);
        let small = std::fs::metadata(&wal).unwrap().len();
        assert!(
            small > 0 && small <= kiln_sqlite::FOLD_WAL_BYTES,
            "a small WAL stays: {small}"
        );
        let store = Store::open(dir.path()).unwrap();
        for i in 0..400 {
            let key = format!("{i:0>200}");
            store.save(&key, &[], Some(&CacheResult::now("r"))).unwrap();
        }
        assert!(std::fs::metadata(&wal).unwrap().len() > kiln_sqlite::FOLD_WAL_BYTES);
        drop(store);
        assert_eq!(std::fs::metadata(&wal).map(|m| m.len()).unwrap_or(0), 0);
        let store = Store::open(dir.path()).unwrap();
        assert_eq!(store.results("small").unwrap().len(), 1);
        assert_eq!(store.check().unwrap().results, 401);
    }

    #[test]
    fn two_handles_on_one_file_see_each_other() {
        let dir = tempfile::tempdir().unwrap();
        let one = Store::open(dir.path()).unwrap();
        let two = Store::open(dir.path()).unwrap();
        one.save("k", &[], Some(&CacheResult::now("r"))).unwrap();
        assert_eq!(two.results("k").unwrap().len(), 1);
    }

    #[test]
    fn a_file_that_is_not_a_database_is_an_error() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(dir.path().join(STORE_FILE), b"not sqlite at all, just text").unwrap();
        let err = Store::open(dir.path()).unwrap_err();
        assert!(err.to_string().contains("cache.db"), "{err}");
    }
}
