#!/usr/bin/env bash
# A first deployment as docs/install.md says, in a fresh folder of its own: a clean venv,
# Airflow 3.3.2 and the wheel with the [sqlite] extra, both connections as documented (the
# Stripe one from the local server), the usage table as "A first run" creates it, then
# `airflow dags test` twice (the second run sends nothing). Needs the sqlite3 command.
#   ./scripts/first_deployment.sh
set -euo pipefail
R=$(cd "$(dirname "$0")/.." && pwd); W=$(mktemp -d -t stripe-meter-first-deployment-XXXX)
echo "working in $W"; mkdir -p $W/dist $W/home/dags $W/srv
cd "$R" && ./dev setup && .venv/bin/python -m uv build --wheel -o $W/dist -q
wheel=$(ls $W/dist/*.whl)
python3 -m venv $W/venv
$W/venv/bin/python -m pip install -q uv
echo '$ pip install "apache-airflow==3.3.2" "'$(basename $wheel)'[sqlite]"   (through uv pip, for time)'
$W/venv/bin/python -m uv pip install -q --python $W/venv/bin/python "apache-airflow==3.3.2" "$wheel[sqlite]"
export AIRFLOW_HOME=$W/home PATH=$W/venv/bin:$PATH
cp $R/example_dags/example_stripe_daily_usage.py $W/home/dags/
python -m airflow_provider_stripe_meter.testing --meter ai_tokens_used > $W/server.txt 2>&1 &
SERVER=$!; trap 'kill $SERVER' EXIT
for _ in $(seq 50); do grep -q AIRFLOW_CONN_STRIPE_DEFAULT $W/server.txt && break; sleep 0.2; done
cat $W/server.txt
eval "export $(grep AIRFLOW_CONN_STRIPE_DEFAULT $W/server.txt)"
export AIRFLOW_CONN_USAGE_DB='{"conn_type": "sqlite", "host": "'$W'/srv/usage.db"}'
sqlite3 $W/srv/usage.db <<'SQL'
CREATE TABLE IF NOT EXISTS usage (customer_id TEXT NOT NULL, tokens INTEGER NOT NULL, used_at TEXT NOT NULL);
INSERT INTO usage VALUES
  ('cus_TrialCustomer1', 1200, date('now', '-1 day') || ' 09:30:00+00:00'),
  ('cus_TrialCustomer1',  800, date('now', '-1 day') || ' 17:45:00+00:00'),
  ('cus_TrialCustomer2',  500, date('now', '-1 day') || ' 11:00:00+00:00');
SQL
airflow providers list 2>/dev/null | grep -E "stripe-meter|sqlite"
airflow db migrate > $W/migrate.txt 2>&1
for n in 1 2; do
  echo "\$ airflow dags test example_stripe_daily_usage   (run $n)"
  airflow dags test example_stripe_daily_usage > $W/run$n.txt 2>&1 || { tail -40 $W/run$n.txt; exit 1; }
  grep -oE "Billed: rows [^;]*" $W/run$n.txt | head -1
  grep -oE "DagRun Finished: dag_id=example_stripe_daily_usage.*state=[a-z]+" $W/run$n.txt | grep -oE "state=[a-z]+" | head -1
  grep -oE "Skipping tasks \[[^]]*\]|Following branch[^,]*" $W/run$n.txt | head -2
done
