"""The PostgreSQL extensions instapg promises its tenants (README "A tenant can").

Both lists are extensions that Amazon RDS for PostgreSQL offers; the local
stack offers the same (tools/pgserver.py), and tests/test_extensions.py has a
tenant create each one over TCP with its password.
"""

from __future__ import annotations

# Trusted extensions: a tenant creates them itself (CREATE on its own database
# is enough; PostgreSQL runs the script as the bootstrap superuser). Other
# extensions, dblink, postgres_fdw and file_fdw among them, stay refused.
TENANT_EXTENSIONS: tuple[str, ...] = (
    "btree_gin",
    "btree_gist",
    "citext",
    "cube",
    "dict_int",
    "fuzzystrmatch",
    "hstore",
    "intarray",
    "isn",
    "lo",
    "ltree",
    "pg_trgm",
    "pgcrypto",
    "seg",
    "tablefunc",
    "tcn",
    "tsm_system_rows",
    "tsm_system_time",
    "unaccent",
    "uuid-ossp",
)

# Not trusted, so no tenant may create them, but harmless and wanted (pgvector):
# the host's superuser (on RDS its master user) installs them once per host in
# template1, and every database created after that has them.
# `CREATE EXTENSION IF NOT EXISTS vector` then succeeds for the tenant.
PREINSTALLED_EXTENSIONS: tuple[str, ...] = ("vector",)
