-- cachetail's bookkeeping, installed in the app's own database (idempotent: IF NOT EXISTS).
-- The capture triggers themselves are generated from the rules (daemon/capture.rs).

-- Every captured row change, in commit order. No AUTOINCREMENT (it costs every app write an
-- extra sqlite_sequence update): ids are max(id)+1, and the daemon never prunes the newest row,
-- so max(id) never goes down and an id is never reused. A cursor can never skip a row.
CREATE TABLE IF NOT EXISTS cachetail_outbox (
    id      INTEGER PRIMARY KEY,
    capture INTEGER NOT NULL,  -- cachetail_capture.id: which table, which columns
    op      INTEGER NOT NULL,  -- 1 insert, 2 update, 3 delete
    old     TEXT,              -- the old row's captured columns: quote()d SQL literals, comma-separated
    new     TEXT,              -- the new row's, likewise
    -- When the write ran: julianday('now'), millisecond precision. Added later: `install`
    -- adds it to an older outbox, whose rows have none.
    at      REAL
);

-- The column layout of each capture trigger generation. Outbox rows name their layout, so rows
-- written before a reload that changed the captured columns still decode.
CREATE TABLE IF NOT EXISTS cachetail_capture (
    id      INTEGER PRIMARY KEY,
    tbl     TEXT NOT NULL,
    columns TEXT NOT NULL,     -- JSON array of column names, in the order the values are stored
    UNIQUE (tbl, columns)
);

-- The durable cursor: the last outbox id whose cache actions are done. Pruning keeps that row;
-- row_id and row_at (its `at`) say which row it was, so that an outbox emptied or rebuilt by
-- hand, whose ids start again below the cursor, is told from the one the cursor was moved in.
CREATE TABLE IF NOT EXISTS cachetail_cursor (
    consumer   TEXT PRIMARY KEY,
    position   INTEGER NOT NULL,
    updated_at TEXT,
    row_id     INTEGER,
    row_at     REAL
);

INSERT OR IGNORE INTO cachetail_cursor (consumer, position, updated_at)
VALUES ('main', 0, strftime('%Y-%m-%dT%H:%M:%fZ', 'now'));

-- Flags: 'paused' = '1' while `cachetail pause` is in force.
CREATE TABLE IF NOT EXISTS cachetail_meta (
    key   TEXT PRIMARY KEY,
    value TEXT
);

-- The lease: which of the daemons on this database applies the outbox (daemon/lease.rs). The
-- epoch rises at each takeover; the cursor moves only while the holder's epoch is still here.
CREATE TABLE IF NOT EXISTS cachetail_lease (
    name       TEXT PRIMARY KEY,
    holder     TEXT NOT NULL,     -- host:pid:nonce:pidns=INODE:boot=BOOT_ID
    epoch      INTEGER NOT NULL,
    expires_at INTEGER NOT NULL   -- unix milliseconds
);
