# Start a throwaway PostgreSQL on 127.0.0.1 for the tests; sourced by .ci/run and usable by hand.
# Exports STRIPE_METER_TEST_PG_DSN, which the PostgreSQL tests read (they skip without it).
start_test_postgres() {
  local bindir port datadir
  bindir=$(ls -d /usr/lib/postgresql/*/bin 2>/dev/null | sort -V | tail -1)
  if [ -z "$bindir" ]; then
    echo "PostgreSQL is not installed: its tests will be skipped" >&2
    return 0
  fi
  port=${PGPORT_TEST:-54329}
  datadir=$(mktemp -d /tmp/stripe-meter-pg.XXXXXX)
  chown postgres "$datadir"
  su postgres -c "$bindir/initdb -D $datadir -A trust -U postgres" >/dev/null
  su postgres -c "$bindir/pg_ctl -D $datadir -o '-p $port -k /tmp -c listen_addresses=127.0.0.1' -l $datadir/log -w start" >/dev/null
  export STRIPE_METER_TEST_PG_DSN="postgresql://postgres@127.0.0.1:$port/postgres"
  echo "PostgreSQL for tests on 127.0.0.1:$port"
}
