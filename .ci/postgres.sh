# Sourced by .ci/run: a local PostgreSQL server on 127.0.0.1 for the scale-out tests. Idempotent, and quick
# when the server is already installed and running. Exports BSTUNE_TEST_POSTGRES: its role (password auth)
# may create databases and roles, so each test makes its own and drops it afterwards.
as_root() { if [ "$(id -u)" = 0 ]; then "$@"; else sudo -n "$@"; fi; }
as_pg() { if [ "$(id -u)" = 0 ]; then runuser -u postgres -- "$@"; else sudo -n -u postgres -- "$@"; fi; }

if ! command -v pg_ctlcluster >/dev/null 2>&1; then
  as_root apt-get update -qq
  as_root env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq postgresql >/dev/null
fi
pg_ver=$(ls /usr/lib/postgresql | sort -V | tail -n 1)
pg_cluster() { pg_lsclusters -h | awk -v v="$pg_ver" '$1 == v && $2 == "main"'; }
[ -n "$(pg_cluster)" ] || as_root pg_createcluster "$pg_ver" main >/dev/null
pg_cluster | grep -q online || as_root pg_ctlcluster "$pg_ver" main start
pg_port=$(pg_cluster | awk '{print $3}')
as_pg psql -p "$pg_port" -qtAc "DO \$\$ BEGIN
  IF NOT EXISTS (SELECT FROM pg_roles WHERE rolname = 'bstune') THEN
    CREATE ROLE bstune LOGIN PASSWORD 'bstune' CREATEDB CREATEROLE;
  END IF;
  IF NOT pg_has_role('bstune', 'pg_signal_backend', 'MEMBER') THEN
    GRANT pg_signal_backend TO bstune;  -- so a test's DROP DATABASE ... WITH (FORCE) may end autovacuum there
  END IF; END \$\$;"
as_pg psql -p "$pg_port" -qtAc "SELECT 1 FROM pg_database WHERE datname = 'bstune'" | grep -q 1 \
  || as_pg createdb -p "$pg_port" -O bstune bstune
export BSTUNE_TEST_POSTGRES="postgresql+psycopg://bstune:bstune@127.0.0.1:${pg_port}/bstune"
