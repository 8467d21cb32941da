-- Bastion audit trail: append-only guards for SQLite (version 1).
--
-- Applied by migration 0003_audit (its frozen copy) and checked by
-- bastion.audit._guards.check_guards. SQLite has no roles: whoever can write
-- the file can drop these triggers, so they stop mistakes and bugs, not an
-- attacker (the Merkle tree and the checkpoints kept elsewhere catch that).
-- Every statement ends with a line holding only ";", which is how bastion
-- splits the file.
--
-- INSERT OR REPLACE (and REPLACE INTO) deletes the row it conflicts with without
-- firing DELETE triggers (unless PRAGMA recursive_triggers is on), so each table
-- also refuses an INSERT whose keys are taken: its primary key, its unique
-- columns and its rowid (an INSERT may name the rowid, a key of its own). Each
-- check is a lookup of one index. ON CONFLICT DO UPDATE fires the UPDATE triggers.
-- These raise FAIL, not ABORT: they fire before their row is written or any row
-- replaced, so FAIL only keeps the rows the statement inserted before (new keys,
-- each checked), and INSERT OR FAIL then needs no statement journal (with ABORT
-- SQLite copies every page an insert touches into one: an entry's insert took
-- twice as long).

-- A row here lets the prune path delete the entries of one log; it inserts and
-- removes the row in the transaction that deletes.
CREATE TABLE IF NOT EXISTS bastion_audit_prune_grants (
    log_id VARCHAR(100) NOT NULL PRIMARY KEY
)
;

CREATE TRIGGER IF NOT EXISTS bastion_audit_entries_no_replace
BEFORE INSERT ON bastion_audit_entries
WHEN EXISTS (SELECT 1 FROM bastion_audit_entries WHERE log_id = NEW.log_id AND seq = NEW.seq)
    OR EXISTS (SELECT 1 FROM bastion_audit_entries WHERE id = NEW.id)
    OR EXISTS (SELECT 1 FROM bastion_audit_entries WHERE rowid = NEW.rowid)
BEGIN
    SELECT RAISE(FAIL, 'bastion audit guard: INSERT over an existing row of bastion_audit_entries is refused, the audit tables are append-only');
END
;

CREATE TRIGGER IF NOT EXISTS bastion_audit_entries_no_update
BEFORE UPDATE ON bastion_audit_entries
BEGIN
    SELECT RAISE(ABORT, 'bastion audit guard: UPDATE on bastion_audit_entries is refused, the audit tables are append-only');
END
;

-- Only the prune path deletes, and only entries whose leaf it archived first, in
-- a segment of the same log whose range covers the entry.
CREATE TRIGGER IF NOT EXISTS bastion_audit_entries_no_delete
BEFORE DELETE ON bastion_audit_entries
WHEN NOT EXISTS (SELECT 1 FROM bastion_audit_prune_grants WHERE log_id = OLD.log_id)
    OR NOT EXISTS (
        SELECT 1 FROM bastion_audit_pruned AS pruned
        JOIN bastion_audit_segments AS segment ON segment.id = pruned.segment_id
        WHERE pruned.log_id = OLD.log_id AND pruned.seq = OLD.seq
            AND pruned.leaf_hash = OLD.leaf_hash
            AND segment.log_id = OLD.log_id
            AND OLD.seq BETWEEN segment.first_seq AND segment.last_seq
    )
BEGIN
    SELECT RAISE(ABORT, 'bastion audit guard: DELETE on bastion_audit_entries is refused, the audit tables are append-only');
END
;

CREATE TRIGGER IF NOT EXISTS bastion_audit_nodes_no_replace
BEFORE INSERT ON bastion_audit_nodes
WHEN EXISTS (SELECT 1 FROM bastion_audit_nodes WHERE log_id = NEW.log_id AND level = NEW.level AND "index" = NEW."index")
    OR EXISTS (SELECT 1 FROM bastion_audit_nodes WHERE rowid = NEW.rowid)
BEGIN
    SELECT RAISE(FAIL, 'bastion audit guard: INSERT over an existing row of bastion_audit_nodes is refused, the audit tables are append-only');
END
;

CREATE TRIGGER IF NOT EXISTS bastion_audit_nodes_no_update
BEFORE UPDATE ON bastion_audit_nodes
BEGIN
    SELECT RAISE(ABORT, 'bastion audit guard: UPDATE on bastion_audit_nodes is refused, the audit tables are append-only');
END
;

CREATE TRIGGER IF NOT EXISTS bastion_audit_nodes_no_delete
BEFORE DELETE ON bastion_audit_nodes
BEGIN
    SELECT RAISE(ABORT, 'bastion audit guard: DELETE on bastion_audit_nodes is refused, the audit tables are append-only');
END
;

CREATE TRIGGER IF NOT EXISTS bastion_audit_checkpoints_no_replace
BEFORE INSERT ON bastion_audit_checkpoints
WHEN EXISTS (SELECT 1 FROM bastion_audit_checkpoints WHERE id = NEW.id)
    OR EXISTS (SELECT 1 FROM bastion_audit_checkpoints WHERE rowid = NEW.rowid)
BEGIN
    SELECT RAISE(FAIL, 'bastion audit guard: INSERT over an existing row of bastion_audit_checkpoints is refused, the audit tables are append-only');
END
;

CREATE TRIGGER IF NOT EXISTS bastion_audit_checkpoints_no_update
BEFORE UPDATE ON bastion_audit_checkpoints
BEGIN
    SELECT RAISE(ABORT, 'bastion audit guard: UPDATE on bastion_audit_checkpoints is refused, the audit tables are append-only');
END
;

CREATE TRIGGER IF NOT EXISTS bastion_audit_checkpoints_no_delete
BEFORE DELETE ON bastion_audit_checkpoints
BEGIN
    SELECT RAISE(ABORT, 'bastion audit guard: DELETE on bastion_audit_checkpoints is refused, the audit tables are append-only');
END
;

CREATE TRIGGER IF NOT EXISTS bastion_audit_segments_no_replace
BEFORE INSERT ON bastion_audit_segments
WHEN EXISTS (SELECT 1 FROM bastion_audit_segments WHERE id = NEW.id)
    OR EXISTS (SELECT 1 FROM bastion_audit_segments WHERE rowid = NEW.rowid)
BEGIN
    SELECT RAISE(FAIL, 'bastion audit guard: INSERT over an existing row of bastion_audit_segments is refused, the audit tables are append-only');
END
;

CREATE TRIGGER IF NOT EXISTS bastion_audit_segments_no_update
BEFORE UPDATE ON bastion_audit_segments
BEGIN
    SELECT RAISE(ABORT, 'bastion audit guard: UPDATE on bastion_audit_segments is refused, the audit tables are append-only');
END
;

CREATE TRIGGER IF NOT EXISTS bastion_audit_segments_no_delete
BEFORE DELETE ON bastion_audit_segments
BEGIN
    SELECT RAISE(ABORT, 'bastion audit guard: DELETE on bastion_audit_segments is refused, the audit tables are append-only');
END
;

CREATE TRIGGER IF NOT EXISTS bastion_audit_pruned_no_replace
BEFORE INSERT ON bastion_audit_pruned
WHEN EXISTS (SELECT 1 FROM bastion_audit_pruned WHERE log_id = NEW.log_id AND seq = NEW.seq)
    OR EXISTS (SELECT 1 FROM bastion_audit_pruned WHERE rowid = NEW.rowid)
BEGIN
    SELECT RAISE(FAIL, 'bastion audit guard: INSERT over an existing row of bastion_audit_pruned is refused, the audit tables are append-only');
END
;

CREATE TRIGGER IF NOT EXISTS bastion_audit_pruned_no_update
BEFORE UPDATE ON bastion_audit_pruned
BEGIN
    SELECT RAISE(ABORT, 'bastion audit guard: UPDATE on bastion_audit_pruned is refused, the audit tables are append-only');
END
;

CREATE TRIGGER IF NOT EXISTS bastion_audit_pruned_no_delete
BEFORE DELETE ON bastion_audit_pruned
BEGIN
    SELECT RAISE(ABORT, 'bastion audit guard: DELETE on bastion_audit_pruned is refused, the audit tables are append-only');
END
;
