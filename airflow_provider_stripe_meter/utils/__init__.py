"""Plain-Python building blocks behind the hook, operators and sensor.

Nothing here imports Airflow or ``stripe`` at module level: input rules, identifiers, daily
aggregation, delivery pacing, reconciliation and source reading are tested on their own.
"""
