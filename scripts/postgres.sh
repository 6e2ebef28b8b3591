# Start a throwaway PostgreSQL on 127.0.0.1 for the tests; sourced by .ci/run and usable by hand.
# Exports STRIPE_METER_TEST_PG_DSN, which the PostgreSQL tests read (they skip without it).
# The server takes a free port (or $PGPORT_TEST), so a second run never meets the first one's;
# stop_test_postgres stops it and removes its data (.ci/run calls it on exit).
start_test_postgres() {
  local bindir port
  bindir=$(ls -d /usr/lib/postgresql/*/bin 2>/dev/null | sort -V | tail -1)
  if [ -z "$bindir" ]; then
    echo "PostgreSQL is not installed: its tests will be skipped" >&2
    return 0
  fi
  port=${PGPORT_TEST:-$(python3 -c 'import socket; s = socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1]); s.close()')}
  STRIPE_METER_TEST_PG_DIR=$(mktemp -d /tmp/stripe-meter-pg.XXXXXX)
  STRIPE_METER_TEST_PG_BIN=$bindir
  chown postgres "$STRIPE_METER_TEST_PG_DIR"
  su postgres -c "$bindir/initdb -D $STRIPE_METER_TEST_PG_DIR -A trust -U postgres" >/dev/null
  su postgres -c "$bindir/pg_ctl -D $STRIPE_METER_TEST_PG_DIR -o '-p $port -k $STRIPE_METER_TEST_PG_DIR -c listen_addresses=127.0.0.1' -l $STRIPE_METER_TEST_PG_DIR/log -w start" >/dev/null
  export STRIPE_METER_TEST_PG_DSN="postgresql://postgres@127.0.0.1:$port/postgres"
  echo "PostgreSQL for tests on 127.0.0.1:$port"
}

stop_test_postgres() {
  [ -n "${STRIPE_METER_TEST_PG_DIR:-}" ] || return 0
  su postgres -c "$STRIPE_METER_TEST_PG_BIN/pg_ctl -D $STRIPE_METER_TEST_PG_DIR -m fast -w stop" >/dev/null 2>&1 || true
  rm -rf "$STRIPE_METER_TEST_PG_DIR"
  unset STRIPE_METER_TEST_PG_DIR STRIPE_METER_TEST_PG_DSN
}
