#!/usr/bin/env bash
# Each service's own PostgreSQL role and database: the role logs in with its own password and owns
# its service's database, and no other role but a superuser (or the administrator that runs this,
# where it is none) may connect to that database (CONNECT revoked from PUBLIC). The shop's
# processes connect as their service's role; the superuser (POSTGRES_USER) runs only this.
#
# docker-compose.yml's one-shot `postgres-roles` runs it at every `docker compose up`, once the
# `postgres` service is healthy and before any service's migration, with the superuser of
# deploy/postgres.env and the roles of deploy/service-roles.env (the postgres server gets the
# first alone; a role's variable the release before left in deploy/postgres.env wins): on a new data volume, on one it has run on before (it is idempotent), and on one
# an earlier release made. To run it alone: `docker compose run --rm postgres-roles`.
# It makes what is missing (a role with no power but to log in), sets each role's password to the
# one given (so a new one replaces the old), and hands a database made before the roles (by an
# earlier release, the superuser's) over to its service's role, with everything in it. For each
# of ORDERS, PAYMENTS and GATEWAY it reads <SERVICE>_DB_NAME, <SERVICE>_DB_USER and
# <SERVICE>_DB_PASSWORD, and it connects with psql as POSTGRES_USER (PGHOST, PGPORT, PGPASSWORD as
# psql reads them, PGPASSWORD taken from POSTGRES_PASSWORD when unset, as the postgres image's
# entrypoint does): it serves another server too, run as a superuser or as an administrator with
# CREATEROLE and CREATEDB (a managed server's), which it makes a member of each service's role so
# as to act on its database.
#
# The passwords reach psql in its environment (read with \getenv: psql 15 or later), never on a
# command line, which any user of the machine may read (ps, /proc/<pid>/cmdline). The server
# receives them in the statements that set them: run as a superuser, the script keeps those out
# of the server's log (log_statement, log_min_error_statement and the like, set for its own
# sessions); an administrator that is no superuser may not, and a server that logs DDL
# (log_statement = 'ddl' or 'all') then logs them.
set -eo pipefail

SERVICES=(ORDERS PAYMENTS GATEWAY)

if [ -z "${PGPASSWORD+set}" ] && [ -n "${POSTGRES_PASSWORD:-}" ]; then
    export PGPASSWORD=$POSTGRES_PASSWORD
fi

run_sql() {  # run_sql DATABASE [psql option...] < SQL
    local database=$1
    shift
    psql -v ON_ERROR_STOP=1 --no-psqlrc --quiet --no-password --username "${POSTGRES_USER:?}" \
        --dbname "$database" "$@"
}

psql_major=$(psql --version | sed -E 's/^[^0-9]*([0-9]+).*$/\1/')
if [ "$psql_major" -lt 15 ]; then
    echo "$(psql --version): psql 15 or later is needed (\\getenv)" >&2
    false
fi

# A role or a database shared by two services would let each into the other's data, and the
# role the script runs as is no service's: refused.
roles=() databases=()
for service in "${SERVICES[@]}"; do
    user_variable=${service}_DB_USER name_variable=${service}_DB_NAME
    password_variable=${service}_DB_PASSWORD
    role=${!user_variable:?$user_variable is not set}
    database=${!name_variable:?$name_variable is not set}
    : "${!password_variable:?$password_variable is not set}"
    for taken in "${POSTGRES_USER:?}" "${roles[@]}"; do
        if [ "$role" = "$taken" ]; then
            echo "$user_variable=$role: each service needs a role of its own, neither" \
                 "POSTGRES_USER nor another service's" >&2
            false
        fi
    done
    for taken in "${databases[@]}"; do
        if [ "$database" = "$taken" ]; then
            echo "$name_variable=$database: each service needs a database of its own" >&2
            false
        fi
    done
    roles+=("$role") databases+=("$database")
done

# A service's role that is a superuser (made so by hand, or named after another administrator's)
# would give its service the whole server: refused before anything is changed. A role the script
# makes has no power but to log in (CREATE ROLE's defaults); one it finds is given its password
# and nothing else: only a superuser may take SUPERUSER, REPLICATION or BYPASSRLS away, and a
# managed server's administrator is none.
for role in "${roles[@]}"; do
    superuser=$(run_sql postgres --tuples-only --no-align -v role="$role" <<'SQL'
SELECT rolsuper FROM pg_roles WHERE rolname = :'role';
SQL
    )
    if [ "$superuser" = t ]; then
        echo "role $role is a superuser: a service's role must not be; nothing was changed" >&2
        false
    fi
done

for service in "${SERVICES[@]}"; do
    user_variable=${service}_DB_USER name_variable=${service}_DB_NAME
    password_variable=${service}_DB_PASSWORD
    role=${!user_variable} database=${!name_variable}

    # (The password is in two of the statements below as the server receives them.)
    run_sql postgres -v role="$role" -v database="$database" \
        -v password_variable="$password_variable" <<'SQL'
\getenv password :password_variable
DO $$
BEGIN
    SET log_statement = 'none';
    SET log_min_error_statement = 'panic';
    SET log_min_duration_statement = -1;
    SET log_min_duration_sample = -1;
    SET log_transaction_sample_rate = 0;
EXCEPTION WHEN insufficient_privilege THEN
    NULL;  -- (no superuser: the server logs as it is set to)
END
$$;
SELECT EXISTS (SELECT FROM pg_roles WHERE rolname = :'role') AS role_exists \gset
\if :role_exists
ALTER ROLE :"role" PASSWORD :'password';
\else
CREATE ROLE :"role" LOGIN PASSWORD :'password';
\endif
-- An administrator that is no superuser may make a database its role's, and reach into it, only
-- as a member of that role (PostgreSQL 16 on: one that may SET ROLE to it and inherits its
-- rights, which the membership it gets with a role it makes does not give).
SELECT NOT rolsuper AND NOT pg_has_role(current_user, :'role', 'USAGE') AS join_role
  FROM pg_roles WHERE rolname = current_user \gset
\if :join_role
GRANT :"role" TO CURRENT_USER;
\endif
SELECT format('CREATE DATABASE %I OWNER %I', :'database', :'role')
 WHERE NOT EXISTS (SELECT FROM pg_database WHERE datname = :'database') \gexec
ALTER DATABASE :"database" OWNER TO :"role";
-- Every role (PUBLIC) may connect to a new database; to this one only its owner may.
REVOKE ALL ON DATABASE :"database" FROM PUBLIC;
GRANT CONNECT, TEMPORARY ON DATABASE :"database" TO :"role";
SQL

    # What the database holds already and another role made (the superuser, before there were
    # service roles) becomes the role's: its migrations alter those tables, its processes use
    # them. (REASSIGN OWNED cannot: it refuses the bootstrap superuser, POSTGRES_USER here.) Each
    # change of owner waits at most 5 s for its table's lock, which a shop still running on the
    # database holds (an earlier release's, as its containers are replaced): queued for it, it
    # would hold up everything after it on the table; then nothing is handed over.
    run_sql "$database" -v role="$role" -v SHOW_CONTEXT=never <<'SQL'
SELECT set_config('hseshop.database_owner', :'role', false) \g /dev/null
SET lock_timeout = '5s';
DO $$
DECLARE
    owner text := current_setting('hseshop.database_owner');
    owner_id oid := (SELECT oid FROM pg_roles WHERE rolname = owner);
    statement text;
BEGIN
    FOR statement IN
        -- Tables, views and sequences of their own; a table's indexes, and the sequences of its
        -- identity and serial columns, go with it.
        SELECT format('ALTER %s %s OWNER TO %I',
                      CASE relkind WHEN 'v' THEN 'VIEW' WHEN 'm' THEN 'MATERIALIZED VIEW'
                                   WHEN 'S' THEN 'SEQUENCE' ELSE 'TABLE' END,
                      relation.oid::regclass, owner)
          FROM pg_class AS relation
         WHERE relnamespace = 'public'::regnamespace AND relkind IN ('r', 'p', 'v', 'm', 'S')
           AND relowner <> owner_id
           AND NOT EXISTS (SELECT FROM pg_depend
                            WHERE classid = 'pg_class'::regclass AND objid = relation.oid
                              AND deptype IN ('a', 'i'))
        UNION ALL
        -- Functions (the outbox's trigger function).
        SELECT format('ALTER ROUTINE %s OWNER TO %I', routine.oid::regprocedure, owner)
          FROM pg_proc AS routine
         WHERE pronamespace = 'public'::regnamespace AND proowner <> owner_id
    LOOP
        EXECUTE statement;
    END LOOP;
EXCEPTION WHEN lock_not_available OR deadlock_detected THEN
    RAISE EXCEPTION 'database %: nothing handed over to role %: a session using it held a lock'
        ' too long (%): stop the HseShop processes that use it first (docker compose stop), then'
        ' run this again', current_database(), owner, SQLERRM;
END
$$;
SQL
    echo "$service: database $database, owned by role $role; no other role may connect to it"
done
