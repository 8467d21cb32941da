-- Bastion audit trail: append-only guards for PostgreSQL (version 1).
--
-- Applied by migration 0003_audit (its frozen copy) and checked by
-- bastion.audit._guards.check_guards. Runs as the owner of the audit tables,
-- in one transaction; psql -1 -f applies it by hand. Every statement ends with
-- a line holding only ";", which is how bastion splits the file.

-- The role whose direct members may prune (delete expired entries). NOLOGIN: it
-- holds privileges, people log in as their own roles granted membership in it.
-- Roles are cluster-wide, so two databases migrating at once may race to create
-- it; an owner without CREATEROLE leaves it to the DBA (check_guards says so).
DO $$
BEGIN
    IF NOT EXISTS (SELECT FROM pg_roles WHERE rolname = 'bastion_audit_maintenance') THEN
        CREATE ROLE bastion_audit_maintenance NOLOGIN;
    END IF;
EXCEPTION
    WHEN duplicate_object OR unique_violation THEN
        NULL;
    WHEN insufficient_privilege THEN
        RAISE WARNING 'cannot create role bastion_audit_maintenance (no CREATEROLE): '
            'create it as a DBA and run this file again to allow pruning';
END
$$
;

-- Nobody holds UPDATE, DELETE or TRUNCATE through a grant, the owner included:
-- the owner keeps the power to grant them back, alter and drop, which is what
-- the Merkle tree and the checkpoints kept elsewhere catch. (TRUNCATE comes
-- first: followed by ON, tools that scan migrations read it as truncating a table.)
REVOKE TRUNCATE, UPDATE, DELETE ON
    bastion_audit_entries, bastion_audit_nodes, bastion_audit_checkpoints,
    bastion_audit_segments, bastion_audit_pruned
FROM PUBLIC, CURRENT_USER
;

DO $$
BEGIN
    IF EXISTS (SELECT FROM pg_roles WHERE rolname = 'bastion_audit_maintenance') THEN
        GRANT SELECT, DELETE ON bastion_audit_entries TO bastion_audit_maintenance;
        GRANT SELECT, INSERT ON bastion_audit_pruned, bastion_audit_segments
            TO bastion_audit_maintenance;
    END IF;
END
$$
;

-- Statement level, so it refuses even a statement that matches no row. The one
-- exception: DELETE on the entries by a direct member of bastion_audit_maintenance
-- (superusers are not let through by their bypass) that opted in with
-- SET LOCAL bastion.audit_prune = 'on'; each deleted row is then checked below.
-- Both functions pin search_path (pg_temp last), so a caller cannot shadow the
-- catalogs or bastion_audit_pruned with objects of its own. INSERT .. ON CONFLICT
-- DO UPDATE and MERGE fire the UPDATE and DELETE statement triggers whether or
-- not a row conflicts or matches (and need the revoked privileges), so they are
-- refused too. The triggers do not fire while session_replication_role is
-- 'replica' (a superuser's, or a role granted SET on it): check_guards reports
-- that setting.
CREATE OR REPLACE FUNCTION bastion_audit_refuse() RETURNS trigger
LANGUAGE plpgsql SET search_path = pg_catalog, pg_temp AS $$
BEGIN
    IF TG_OP = 'DELETE'
        AND TG_TABLE_NAME = 'bastion_audit_entries'
        AND current_setting('bastion.audit_prune', true) = 'on'
        AND EXISTS (
            SELECT FROM pg_auth_members AS m
            JOIN pg_roles AS role ON role.oid = m.roleid
            JOIN pg_roles AS member ON member.oid = m.member
            WHERE role.rolname = 'bastion_audit_maintenance' AND member.rolname = session_user
        )
    THEN
        RETURN NULL;
    END IF;
    RAISE EXCEPTION 'bastion audit guard: % on % is refused, the audit tables are append-only',
        TG_OP, TG_TABLE_NAME
        USING ERRCODE = 'BA001',
              HINT = 'only pruning deletes entries: bastion audit prune, as a member of '
                     'bastion_audit_maintenance';
END
$$
;

-- A pruned entry keeps its leaf in bastion_audit_pruned, so the tree stays whole,
-- under a segment of the same log whose range covers it (the segment names the
-- archive file and its hash).
CREATE OR REPLACE FUNCTION bastion_audit_check_pruned() RETURNS trigger
LANGUAGE plpgsql SET search_path = pg_catalog, pg_temp AS $$
DECLARE
    archived boolean;
BEGIN
    -- The tables of the entries' own schema, named explicitly.
    EXECUTE format(
        'SELECT EXISTS (SELECT FROM %1$I.bastion_audit_pruned AS pruned '
        'JOIN %1$I.bastion_audit_segments AS segment ON segment.id = pruned.segment_id '
        'WHERE pruned.log_id = $1 AND pruned.seq = $2 AND pruned.leaf_hash = $3 '
        'AND segment.log_id = $1 AND $2 BETWEEN segment.first_seq AND segment.last_seq)',
        TG_TABLE_SCHEMA
    ) INTO archived USING OLD.log_id, OLD.seq, OLD.leaf_hash;
    IF NOT archived THEN
        RAISE EXCEPTION 'bastion audit guard: entry %/% is not archived in bastion_audit_pruned '
            'under a segment of its log that covers it', OLD.log_id, OLD.seq
            USING ERRCODE = 'BA001';
    END IF;
    RETURN OLD;
END
$$
;

DO $$
DECLARE
    guarded text;
BEGIN
    FOREACH guarded IN ARRAY ARRAY[
        'bastion_audit_entries', 'bastion_audit_nodes', 'bastion_audit_checkpoints',
        'bastion_audit_segments', 'bastion_audit_pruned'
    ] LOOP
        EXECUTE format('DROP TRIGGER IF EXISTS bastion_audit_append_only ON %I', guarded);
        EXECUTE format(
            'CREATE TRIGGER bastion_audit_append_only BEFORE UPDATE OR DELETE OR TRUNCATE ON %I '
            'FOR EACH STATEMENT EXECUTE FUNCTION bastion_audit_refuse()',
            guarded
        );
    END LOOP;
END
$$
;

DROP TRIGGER IF EXISTS bastion_audit_pruned_only ON bastion_audit_entries
;

CREATE TRIGGER bastion_audit_pruned_only BEFORE DELETE ON bastion_audit_entries
FOR EACH ROW EXECUTE FUNCTION bastion_audit_check_pruned()
;
