"""Alembic environment: always driven by ``node.db.migrate`` with an open connection.

Nobody runs ``alembic`` by hand: ``make_engine`` upgrades the database at start-up.  A developer
adding a revision writes it under ``versions/`` (``down_revision`` = the previous head) and the
test ``tests/test_postgres.py::test_migrations_match_the_orm`` fails until it matches the ORM.
"""

from __future__ import annotations

from alembic import context

from node.db import Base

connection = context.config.attributes.get("connection")
if connection is None:
    raise RuntimeError(
        "node/migrations runs from node.db.migrate (make_engine) with an open connection"
    )
context.configure(
    connection=connection,
    target_metadata=Base.metadata,
    render_as_batch=connection.dialect.name == "sqlite",
)
with context.begin_transaction():
    context.run_migrations()
