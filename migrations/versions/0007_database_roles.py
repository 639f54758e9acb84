"""Database roles: the projector writes, the API reads, the regulator reads its views.

Revision ID: 0007
Revises: 0006
Create Date: 2026-11-29

Three roles, created cluster-wide by the set-up's superuser step
(``streams/tools/devstack/postgres.py`` ``ensure_app_roles``; PostgreSQL roles are
not per database, so a migration run by the non-superuser owner cannot own them):

- ``capledger_projector``: reads and writes the projection's rows, truncates them for
  a rebuild (no DDL, not the alembic version table);
- ``capledger_api``: reads every projection table and view;
- ``capledger_regulator``: reads only the documented regulator views below, nothing
  else, and writes nothing.

The regulator views (documented in docs/decisions/0060-kafka-security.md):
``regulator_blocks``, ``regulator_transactions`` (no raw bytes),
``regulator_rejections``, the existing ``address_balance``, and the surveillance
views of revision 0005 and ``market_balance`` of 0003 (SURVEILLANCE_VIEWS). A view reads its
tables with its owner's rights, so the regulator needs no grant on the tables.

Downgrade revokes every grant in this database and drops the views; the roles stay
(other databases of the cluster may use them).
"""

from __future__ import annotations

from alembic import op

revision = "0007"
down_revision = "0006"
branch_labels = None
depends_on = None

PROJECTOR = "capledger_projector"
API = "capledger_api"
REGULATOR = "capledger_regulator"
ROLES = (PROJECTOR, API, REGULATOR)

REGULATOR_VIEWS = {
    "regulator_blocks": """
        SELECT height, hash, prev_hash, proposer, round, time_at, tx_count, size_bytes,
               state_hash, voters
        FROM block""",
    "regulator_transactions": """
        SELECT txid, height, position, size_bytes, issued_asset_id, issued_quantity
        FROM tx""",
    "regulator_rejections": """
        SELECT log_offset, txid, stage, code, message, institution, submitter, rejected_at
        FROM tx_rejection""",
}
# The surveillance views of revision 0005 (docs/regulator-sql.md) and the market's
# balances of revision 0003 are the regulator's too.
SURVEILLANCE_VIEWS = ("position_change", "large_position_change", "refused_settlement",
                      "transfer_concentration", "consensus_evidence", "legacy_settlement",
                      "market_balance")
REGULATOR_READS = (*REGULATOR_VIEWS, "address_balance", *SURVEILLANCE_VIEWS)

_REQUIRE_ROLES = """
DO $$
DECLARE missing text;
BEGIN
    SELECT string_agg(name, ', ') INTO missing
    FROM unnest(ARRAY[{names}]) AS name
    WHERE NOT EXISTS (SELECT FROM pg_roles WHERE rolname = name);
    IF missing IS NOT NULL THEN
        RAISE EXCEPTION 'roles % do not exist: the set-up creates them (capledger dev up, '
                        'or streams.tools.devstack.postgres.ensure_app_roles as superuser)',
                        missing;
    END IF;
END $$
"""

_ON_DATABASE = """
DO $$ BEGIN
    EXECUTE format('{verb} CONNECT ON DATABASE %I {word} {roles}', current_database());
END $$
"""


def upgrade() -> None:
    names = ", ".join(f"'{role}'" for role in ROLES)
    op.execute(_REQUIRE_ROLES.format(names=names))
    for name, body in REGULATOR_VIEWS.items():
        op.execute(f"CREATE VIEW {name} AS {body}")
    everyone = ", ".join(ROLES)
    op.execute(_ON_DATABASE.format(verb="GRANT", word="TO", roles=everyone))
    # Not even session-temporary tables for the platform's roles: only the owner.
    op.execute(_ON_DATABASE.replace("CONNECT", "TEMPORARY").format(
        verb="REVOKE", word="FROM", roles="PUBLIC"))
    op.execute(f"GRANT USAGE ON SCHEMA public TO {everyone}")
    op.execute(f"GRANT SELECT, INSERT, UPDATE, DELETE, TRUNCATE ON ALL TABLES IN SCHEMA "
               f"public TO {PROJECTOR}")  # TRUNCATE: `capledger project --rebuild`
    op.execute(f"GRANT USAGE, SELECT ON ALL SEQUENCES IN SCHEMA public TO {PROJECTOR}")
    op.execute(f"REVOKE ALL ON alembic_version FROM {PROJECTOR}")
    op.execute(f"GRANT SELECT ON ALL TABLES IN SCHEMA public TO {API}")
    op.execute(f"GRANT SELECT ON {', '.join(REGULATOR_READS)} TO {REGULATOR}")
    # Tables of later revisions (created by the same owner) get the same grants.
    op.execute(f"ALTER DEFAULT PRIVILEGES IN SCHEMA public GRANT SELECT, INSERT, UPDATE, "
               f"DELETE, TRUNCATE ON TABLES TO {PROJECTOR}")
    op.execute(f"ALTER DEFAULT PRIVILEGES IN SCHEMA public GRANT SELECT ON TABLES TO {API}")


def downgrade() -> None:
    everyone = ", ".join(ROLES)
    op.execute(f"ALTER DEFAULT PRIVILEGES IN SCHEMA public REVOKE SELECT ON TABLES FROM {API}")
    op.execute(f"ALTER DEFAULT PRIVILEGES IN SCHEMA public REVOKE SELECT, INSERT, UPDATE, "
               f"DELETE, TRUNCATE ON TABLES FROM {PROJECTOR}")
    op.execute(f"REVOKE ALL ON ALL TABLES IN SCHEMA public FROM {everyone}")
    op.execute(f"REVOKE ALL ON ALL SEQUENCES IN SCHEMA public FROM {everyone}")
    op.execute(f"REVOKE USAGE ON SCHEMA public FROM {everyone}")
    op.execute(_ON_DATABASE.format(verb="REVOKE", word="FROM", roles=everyone))
    op.execute(_ON_DATABASE.replace("CONNECT", "TEMPORARY").format(
        verb="GRANT", word="TO", roles="PUBLIC"))
    for name in reversed(list(REGULATOR_VIEWS)):
        op.execute(f"DROP VIEW {name}")
