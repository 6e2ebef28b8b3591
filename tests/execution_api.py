"""The in-process Execution API that ``dag.test()`` reports to, built for the API version the
task SDK speaks only.

Airflow builds that app (one per process, on a task's first call) with the routes of every API
version it still serves to older workers: about 9 s of CPU on a 2-core machine, in each pytest
worker and each fork server, most of it for versions no task here ever asks for. The task SDK
installed beside this Airflow sends the newest version (``Airflow-API-Version``), whose routes
and schemas are the head's, so the app built for that version alone answers every request a
test's task makes exactly as the full one does (about 3 s of CPU). The api-server of the system
test, a process of its own, still builds every version.
"""

from __future__ import annotations


def build_for_the_newest_version_only() -> None:
    """Make the in-process Execution API built from now on in this process serve the newest API
    version only. Call before a task runs; without cadwyn's or Airflow's expected layout (another
    Airflow), nothing changes and the full app is built."""
    try:
        from airflow.api_fastapi.execution_api import versions
        from airflow.api_fastapi.execution_api.routes import execution_api_router
        from airflow.sdk.api.datamodels._generated import API_VERSION
        from cadwyn import HeadVersion, Version, VersionBundle
        from cadwyn.route_generation import _DELETED_ROUTE_TAG
    except ImportError:
        return
    if versions.bundle.versions[0].value != API_VERSION:
        return  # the SDK speaks an older version than the newest: that one needs its changes
    # Routes that exist only in older versions must be restored by one of them; with no older
    # version, they are not served at all (as the newest version does not serve them).
    execution_api_router.routes[:] = [
        route for route in execution_api_router.routes if _DELETED_ROUTE_TAG not in getattr(route, "tags", ())
    ]
    versions.bundle = VersionBundle(HeadVersion(), Version(API_VERSION))
