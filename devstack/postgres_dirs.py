"""The names the data directories of devstack's embedded PostgreSQL servers take in a run's
folder. Plain names, importing nothing: devstack.clean (`make clean`) reads them with the
standard library alone, so that it runs on a venv whose packages are not (all) installed."""

# `make run`'s server's (infra.start_embedded_postgres's data_dir).
RUN_DATA_DIR = "postgres"
# The stacks' own servers' (Stack.own_postgres_dir, `postgres-<8 hex>`), and initdb's folders.
OWN_DATA_DIRS = "postgres-*"
STAGING_DIRS = ".postgres-*.initdb"
