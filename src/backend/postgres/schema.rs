//! The tables, the sequence and the functions the PostgreSQL backend keeps
//! in its schema, created if absent (idempotent DDL), and the SQL of every
//! statement it prepares.
//!
//! ```text
//! {schema}.tokens       sequence: every fencing token, every record revision
//! {schema}.servers      live Clastor servers: id, expires_at (the database's clock)
//! {schema}.contenders   one row per holder or waiter: (server, tag) key, seq from tokens
//! {schema}.kinds        a kind's version record (version_record.rs) and its revision
//! {schema}.rotations    a rotation's claim, tied to its driver's server row
//! {schema}.meta         the schema's version, so a restart does not redo the DDL
//! ```
//!
//! **Why functions.** A lock decision needs several statements in one
//! transaction, each with a fresh snapshot (an advisory lock taken, then a
//! read that must see everything committed before it was granted). A
//! PL/pgSQL function called by one prepared statement is that transaction
//! in one round trip, and, unlike `BEGIN … COMMIT`, it can be pipelined on
//! a client shared by many tasks: tokio-postgres sends every statement of
//! a client down one connection in order.
//!
//! **Two advisory locks, held for one transaction, never across calls.**
//! - *Key lock* (`{schema}/{kind}/{version}/{id}`, exclusive): an acquire
//!   takes it before `nextval`, so per lock the sequence hands out numbers
//!   in commit order — every contender with a lower `seq` is committed
//!   before a higher one exists, and the snapshot of the acquire's next
//!   statement, and any later one, sees them all. A release takes it
//!   before its delete and looks for waiters to notify in the next
//!   statement, so a waiter that looked before the delete was committed is
//!   always notified: it committed its insert before the release had the
//!   lock, hence before the release looked.
//! - *Kind lock* (`{schema}/{kind}`): acquires take it shared before they
//!   compare the kind's revision, every write of the record takes it
//!   exclusive. So a rotation's mark waits for acquires in flight, and an
//!   acquire after it sees the new revision and creates nothing.
//!
//! A hash collision between two names only makes them wait for each other
//! for a transaction; nothing is decided by the lock alone.

/// Run on every connection of ours when it opens (pool and session).
///
/// **No sequential scans.** `contenders` is a queue: rows come and go by the
/// thousand while few live at once, so after a burst (or a long transaction
/// elsewhere holding back vacuum) the table and its indexes are many pages
/// of dead rows around a handful of live ones. Statistics then say "a few
/// rows in many pages", and the planner prices an index scan by the index's
/// pages per row: the acquire's look for the first contender becomes a
/// sequential scan of the whole table, on every acquire, until vacuum
/// catches up (`tests/postgres_servers.rs` makes it happen: two bursts,
/// 1,300 pages read per acquire; seen here at 700 pages and 0.4 ms a
/// call). Every statement of ours has an index to use, so disabling the
/// sequential scan only takes that path away.
pub const SESSION_SETTINGS: &str = "SET enable_seqscan = off";

/// The version of the DDL below; a schema at another version is brought up
/// to this one on connect.
/// Version 2 added `contenders.shared` and the shared-aware `acquire`.
pub(super) const SCHEMA_VERSION: &str = "2";

/// A validated schema name and the names derived from it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(super) struct Schema {
    /// The schema (an unquoted identifier: `[a-z_][a-z0-9_]*`).
    pub(super) name: String,
    /// The LISTEN/NOTIFY channel: `{schema}_locks`.
    pub(super) channel: String,
}

/// The longest schema name accepted (PostgreSQL identifiers have 63 bytes;
/// the channel name adds `_locks`).
pub(super) const MAX_SCHEMA_LEN: usize = 48;

impl Schema {
    /// Checks `name`: lower-case letters, digits and `_`, not starting with
    /// a digit, at most [`MAX_SCHEMA_LEN`] bytes, not a PostgreSQL system
    /// schema — so it is used unquoted and means the same to `psql`.
    pub(super) fn new(name: &str) -> Result<Schema, String> {
        let ok = !name.is_empty()
            && name.len() <= MAX_SCHEMA_LEN
            && name
                .bytes()
                .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'_')
            && !name.as_bytes()[0].is_ascii_digit()
            && !name.starts_with("pg_")
            && name != "public"
            && name != "information_schema";
        if !ok {
            return Err(format!(
                "bad PostgreSQL schema name {name:?}: 1 to {MAX_SCHEMA_LEN} lower-case letters, digits or '_', \
                 not starting with a digit or pg_, not public"
            ));
        }
        Ok(Schema {
            name: name.to_owned(),
            channel: format!("{name}_locks"),
        })
    }

    /// Replaces `{s}` with the schema name and `{channel}` with the channel.
    fn sql(&self, text: &str) -> String {
        text.replace("{s}", &self.name).replace("{channel}", &self.channel)
    }

    /// The whole DDL, in one string for one `batch_execute` inside the
    /// installing transaction.
    pub(super) fn ddl(&self) -> String {
        self.sql(DDL)
    }

    /// First statement of the install: the schema and its `meta` table.
    pub(super) fn bootstrap(&self) -> String {
        self.sql(
            "CREATE SCHEMA IF NOT EXISTS {s};
             CREATE TABLE IF NOT EXISTS {s}.meta (key text PRIMARY KEY, value text NOT NULL);",
        )
    }

    /// The installed schema version.
    pub(super) fn read_version(&self) -> String {
        self.sql("SELECT value FROM {s}.meta WHERE key = 'schema'")
    }

    /// Records the installed version.
    pub(super) fn write_version(&self) -> String {
        self.sql(&format!(
            "INSERT INTO {{s}}.meta (key, value) VALUES ('schema', '{SCHEMA_VERSION}')
             ON CONFLICT (key) DO UPDATE SET value = EXCLUDED.value"
        ))
    }

    /// The statements each pooled connection prepares.
    pub(super) fn statements(&self) -> StatementsSql {
        StatementsSql {
            acquire: self.sql("SELECT * FROM {s}.acquire($1, $2, $3, $4, $5, $6, $7, $8, $9)"),
            // Our row's seq, and the first live row that blocks it (ours when
            // none does): every row for an exclusive one ($6 false), only
            // exclusive ones for a shared one.
            turn: self.sql(
                "SELECT m.seq,
                        (SELECT c.seq FROM {s}.contenders c JOIN {s}.servers sv ON sv.id = c.server
                          WHERE c.kind = $1 AND c.version = $2 AND c.id = $3 AND sv.expires_at > now()
                            AND (NOT $6::boolean OR NOT c.shared OR c.seq = m.seq)
                          ORDER BY c.seq LIMIT 1)
                   FROM (SELECT (SELECT c.seq FROM {s}.contenders c WHERE c.server = $4 AND c.tag = $5) AS seq) m",
            ),
            release: self.sql("SELECT {s}.release($1, $2)"),
            read_kind: self.sql("SELECT record, rev FROM {s}.kinds WHERE kind = $1"),
            set_record: self.sql("SELECT {s}.set_record($1, $2, $3, $4)"),
            count_lock: self
                .sql("SELECT count(*) FROM {s}.contenders c WHERE c.kind = $1 AND c.version = $2 AND c.id = $3"),
            census: self.sql(
                "SELECT x.id, x.n, sum(x.n) OVER ()::bigint FROM
                   (SELECT c.id, count(*) AS n FROM {s}.contenders c WHERE c.kind = $1 AND c.version = $2
                     GROUP BY c.id ORDER BY c.id) x
                 LIMIT 256",
            ),
            drop_version: self.sql("DELETE FROM {s}.contenders c WHERE c.kind = $1 AND c.version = $2"),
            claim: self.sql("SELECT won, holder, record, rev FROM {s}.claim_rotation($1, $2, $3)"),
            unclaim: self.sql("DELETE FROM {s}.rotations WHERE kind = $1 AND server = $2 AND claim = $3"),
            reap: self.sql("SELECT {s}.reap($1, $2)"),
            register: self.sql(
                "INSERT INTO {s}.servers (name, ttl_ms, expires_at)
                 VALUES ($1, $2, now() + $3::float8 * interval '1 millisecond') RETURNING id",
            ),
            heartbeat: self.sql(
                "WITH hb AS (UPDATE {s}.servers SET expires_at = now() + $2::float8 * interval '1 millisecond'
                              WHERE id = $1 AND expires_at > now() RETURNING id)
                 SELECT (SELECT count(*) FROM hb),
                        ARRAY(SELECT t FROM unnest($3::bigint[]) AS t
                              WHERE NOT EXISTS (SELECT 1 FROM {s}.contenders c WHERE c.server = $1 AND c.tag = t))",
            ),
        }
    }
}

/// The SQL of every prepared statement (`pool.rs` prepares them).
#[derive(Debug)]
pub(super) struct StatementsSql {
    pub(super) acquire: String,
    pub(super) turn: String,
    pub(super) release: String,
    pub(super) read_kind: String,
    pub(super) set_record: String,
    pub(super) count_lock: String,
    pub(super) census: String,
    pub(super) drop_version: String,
    pub(super) claim: String,
    pub(super) unclaim: String,
    pub(super) reap: String,
    pub(super) register: String,
    pub(super) heartbeat: String,
}

/// Key that serialises every install of any schema in one database.
pub(super) const INSTALL_LOCK: i64 = 0x636c_6173_746f_7201;

/// The DDL (module docs). `{s}`: the schema; `{channel}`: the channel.
const DDL: &str = r#"
CREATE SEQUENCE IF NOT EXISTS {s}.tokens;
CREATE SEQUENCE IF NOT EXISTS {s}.server_ids;

CREATE TABLE IF NOT EXISTS {s}.servers (
    id         bigint PRIMARY KEY DEFAULT nextval('{s}.server_ids'),
    name       text NOT NULL,
    ttl_ms     bigint NOT NULL,
    started    timestamptz NOT NULL DEFAULT now(),
    expires_at timestamptz NOT NULL
);

CREATE TABLE IF NOT EXISTS {s}.contenders (
    server  bigint NOT NULL,
    tag     bigint NOT NULL,
    seq     bigint NOT NULL DEFAULT nextval('{s}.tokens'),
    kind    text NOT NULL,
    version text NOT NULL,
    id      text NOT NULL,
    owner   text NOT NULL,
    created timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (server, tag)
);
CREATE INDEX IF NOT EXISTS contenders_queue ON {s}.contenders (kind, version, id, seq);
-- Schema version 2: a reader's row (a shared lock). A server of version 1
-- ignores the column and treats every row as exclusive: it waits for the
-- readers too, which is stricter, never looser.
ALTER TABLE {s}.contenders ADD COLUMN IF NOT EXISTS shared boolean NOT NULL DEFAULT false;

CREATE TABLE IF NOT EXISTS {s}.kinds (
    kind   text PRIMARY KEY,
    record text NOT NULL,
    rev    bigint NOT NULL
);

CREATE TABLE IF NOT EXISTS {s}.rotations (
    kind   text PRIMARY KEY,
    server bigint NOT NULL,
    claim  text NOT NULL
);

-- One acquire, in two statements: take the shared kind lock and the key
-- lock; then, with a snapshot that sees every row of the lock committed
-- before the key lock was ours, insert our row with the next token — only
-- if the kind's revision is p_rev and our server row is live — and read
-- the lock's first live row that blocks ours (ours, if none does): any row
-- before an exclusive one (p_shared false), an exclusive row before a
-- shared one — so readers hold together, and a reader queued behind a
-- writer waits for it (no writer is starved). Granted when head = seq.
-- When nothing was inserted, seq is NULL and the record is returned (or,
-- if the revision matched, our server row is not live: an error). With
-- p_try (a try-once), a row that is not granted is deleted again before
-- the commit: a failed try leaves nothing, and needs no notification (no
-- row comes after it yet). The 8-argument form of schema version 1 may
-- remain beside it for servers of that version.
CREATE OR REPLACE FUNCTION {s}.acquire(p_kind text, p_version text, p_id text, p_server bigint,
                                       p_tag bigint, p_owner text, p_rev bigint, p_try boolean,
                                       p_shared boolean,
                                       OUT seq bigint, OUT head bigint, OUT record text, OUT rev bigint)
LANGUAGE plpgsql AS $fn$
#variable_conflict use_column
BEGIN
    PERFORM pg_advisory_xact_lock_shared(hashtextextended('{s}/' || p_kind, 0)),
            pg_advisory_xact_lock(hashtextextended('{s}/' || p_kind || '/' || p_version || '/' || p_id, 1));
    WITH ins AS (
        INSERT INTO {s}.contenders AS c (server, tag, kind, version, id, owner, shared)
        SELECT p_server, p_tag, p_kind, p_version, p_id, p_owner, p_shared
         WHERE coalesce((SELECT k.rev FROM {s}.kinds k WHERE k.kind = p_kind), 0) = p_rev
           AND EXISTS (SELECT 1 FROM {s}.servers sv WHERE sv.id = p_server AND sv.expires_at > now())
        RETURNING c.seq
    )
    SELECT ins.seq,
           coalesce((SELECT c.seq FROM {s}.contenders c JOIN {s}.servers sv ON sv.id = c.server
                      WHERE c.kind = p_kind AND c.version = p_version AND c.id = p_id AND sv.expires_at > now()
                        AND (NOT p_shared OR NOT c.shared)
                      ORDER BY c.seq LIMIT 1), ins.seq)
      INTO seq, head FROM ins;
    IF NOT FOUND THEN
        SELECT k.rev, k.record INTO rev, record FROM {s}.kinds k WHERE k.kind = p_kind;
        rev := coalesce(rev, 0);
        IF rev = p_rev THEN
            RAISE EXCEPTION 'clastor server % is not live (expired or reaped)', p_server USING ERRCODE = 'CLS01';
        END IF;
        RETURN;
    END IF;
    rev := p_rev;
    IF p_try AND head <> seq THEN
        DELETE FROM {s}.contenders c WHERE c.server = p_server AND c.tag = p_tag;
    END IF;
END
$fn$;

-- One release: take the key lock of our row, then delete it and, with a
-- snapshot that sees every row committed before the lock was ours, notify
-- the lock's waiters if any row of it is left. Whether a row was there.
CREATE OR REPLACE FUNCTION {s}.release(p_server bigint, p_tag bigint)
RETURNS boolean
LANGUAGE plpgsql AS $fn$
DECLARE
    n bigint;
BEGIN
    PERFORM pg_advisory_xact_lock(hashtextextended('{s}/' || c.kind || '/' || c.version || '/' || c.id, 1))
       FROM {s}.contenders c WHERE c.server = p_server AND c.tag = p_tag;
    IF NOT FOUND THEN
        RETURN false;
    END IF;
    WITH d AS (
        DELETE FROM {s}.contenders c WHERE c.server = p_server AND c.tag = p_tag
        RETURNING c.kind, c.version, c.id
    )
    SELECT count(pg_notify('{channel}', 'L' || d.kind || '/' || d.version || '/' || d.id)) INTO n FROM d
     WHERE EXISTS (SELECT 1 FROM {s}.contenders c
                    WHERE c.kind = d.kind AND c.version = d.version AND c.id = d.id
                      AND (c.server, c.tag) <> (p_server, p_tag));
    RETURN true;
END
$fn$;

-- Deletes server rows and their contenders: p_server's, or (NULL) every
-- row expired by the database's clock; with p_orphans also contenders
-- whose server row is gone. Waiters of every lock touched are notified.
-- How many contenders went.
CREATE OR REPLACE FUNCTION {s}.reap(p_server bigint, p_orphans boolean)
RETURNS integer
LANGUAGE plpgsql AS $fn$
DECLARE
    r record;
    n integer := 0;
BEGIN
    FOR r IN
        WITH dead AS (
            DELETE FROM {s}.servers sv
             WHERE (p_server IS NULL AND sv.expires_at <= now()) OR sv.id = p_server
            RETURNING sv.id
        ), gone AS (
            DELETE FROM {s}.contenders c
             WHERE c.server IN (SELECT id FROM dead)
                OR (p_orphans AND NOT EXISTS (SELECT 1 FROM {s}.servers sv WHERE sv.id = c.server))
            RETURNING c.kind, c.version, c.id
        )
        SELECT g.kind, g.version, g.id, count(*) AS k FROM gone g GROUP BY g.kind, g.version, g.id
    LOOP
        n := n + r.k;
        PERFORM pg_notify('{channel}', 'L' || r.kind || '/' || r.version || '/' || r.id);
    END LOOP;
    RETURN n;
END
$fn$;

-- A conditional write of a kind's record under the exclusive kind lock:
-- only if its revision is p_expected (0: no row), and with p_unclaimed only
-- if no live server claims the kind's rotation. The new revision, or NULL.
CREATE OR REPLACE FUNCTION {s}.set_record(p_kind text, p_expected bigint, p_record text, p_unclaimed boolean)
RETURNS bigint
LANGUAGE plpgsql AS $fn$
DECLARE
    r bigint;
BEGIN
    PERFORM pg_advisory_xact_lock(hashtextextended('{s}/' || p_kind, 0));
    IF p_unclaimed AND EXISTS (
        SELECT 1 FROM {s}.rotations ro JOIN {s}.servers sv ON sv.id = ro.server
         WHERE ro.kind = p_kind AND sv.expires_at > now()
    ) THEN
        RETURN NULL;
    END IF;
    IF p_expected = 0 THEN
        INSERT INTO {s}.kinds AS k (kind, record, rev) VALUES (p_kind, p_record, nextval('{s}.tokens'))
            ON CONFLICT (kind) DO NOTHING RETURNING k.rev INTO r;
    ELSE
        UPDATE {s}.kinds k SET record = p_record, rev = nextval('{s}.tokens')
         WHERE k.kind = p_kind AND k.rev = p_expected RETURNING k.rev INTO r;
    END IF;
    IF r IS NOT NULL THEN
        PERFORM pg_notify('{channel}', 'K' || p_kind);
    END IF;
    RETURN r;
END
$fn$;

-- Claims a kind's rotation for p_server, taking over a claim whose server
-- is no longer live; then the claim as it stands and the kind's record.
CREATE OR REPLACE FUNCTION {s}.claim_rotation(p_kind text, p_server bigint, p_claim text)
RETURNS TABLE (won boolean, holder text, record text, rev bigint)
LANGUAGE plpgsql AS $fn$
#variable_conflict use_column
DECLARE
    w text;
BEGIN
    INSERT INTO {s}.rotations AS ro (kind, server, claim) VALUES (p_kind, p_server, p_claim)
        ON CONFLICT (kind) DO UPDATE SET server = EXCLUDED.server, claim = EXCLUDED.claim
        WHERE NOT EXISTS (SELECT 1 FROM {s}.servers sv WHERE sv.id = ro.server AND sv.expires_at > now())
        RETURNING ro.claim INTO w;
    RETURN QUERY SELECT w IS NOT NULL,
        (SELECT ro.claim FROM {s}.rotations ro WHERE ro.kind = p_kind),
        (SELECT k.record FROM {s}.kinds k WHERE k.kind = p_kind),
        coalesce((SELECT k.rev FROM {s}.kinds k WHERE k.kind = p_kind), 0::bigint);
END
$fn$;
"#;

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn schema_names() {
        assert_eq!(
            Schema::new("clastor"),
            Ok(Schema {
                name: "clastor".into(),
                channel: "clastor_locks".into()
            })
        );
        assert!(Schema::new("a_1").is_ok());
        for bad in [
            "",
            "1a",
            "Clastor",
            "a-b",
            "a.b",
            "pg_x",
            "public",
            "a\"b",
            &"a".repeat(49),
        ] {
            assert!(Schema::new(bad).is_err(), "{bad:?}");
        }
        let s = Schema::new("locks").unwrap_or_else(|e| panic!("{e}"));
        assert!(s.ddl().contains("locks.contenders"));
        assert!(!s.ddl().contains("{s}"));
        assert!(s.ddl().contains("pg_notify('locks_locks'"));
    }
}
