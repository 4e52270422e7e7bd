"""What the stockstream DAGs share: running the project's commands (commands.py), turning a gap
report into mapped backfills (plan.py), and the failure callback (alerting.py).

The DAGs never import `stockstream`: Airflow has its own virtualenv (scripts/airflow_env.sh) and
the pipeline's code runs as the project's own commands (`stockstream`, scripts/dbt.sh), with the
exit codes and JSON output those commands document. commands.py and plan.py import nothing
from Airflow either, so they are tested without it (tests/unit/test_airflow_plan.py).
"""
