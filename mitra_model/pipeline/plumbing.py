"""Prefect plumbing the pipeline needs but should not read like: run tags, the schedule check.

Kept out of `flows/mitra_build.py`, which reads as the pipeline.
"""

from __future__ import annotations

import sys
import time
from datetime import datetime

from prefect.client.orchestration import get_client
from prefect.client.schemas.filters import DeploymentFilter, FlowRunFilter
from prefect.client.schemas.objects import StateType
from prefect.client.schemas.sorting import FlowRunSort
from prefect.runtime import flow_run


def tag_this_flow_run(tag: str) -> None:
    """Tag the running flow run (the UI finds a variant's builds by it), and only the flow run.

    Not with `prefect.tags()`: every task run created inside it would inherit the tag, and Prefect
    asks the server for a tag's concurrency slots before each tagged task run starts. Its client
    caches "no limit for this tag" for only 5 s, so after every task longer than that it asks
    again; on the SQLite server that write races the server's task-run recorder, gets a 503
    ("database is locked") and the client retries after a 2 s back-off: 55 s lost per full build.
    """
    run_id = flow_run.id
    with get_client(sync_client=True) as client:
        current = client.read_flow_run(run_id).tags or []
        client.update_flow_run(run_id, tags=sorted({*current, tag}))


def upcoming_runs(deployment: str, *, wait_s: float = 30.0, limit: int = 3) -> list[datetime]:
    """The start times of the next runs the server's scheduler created for `deployment`.

    Args:
        deployment: "flow-name/deployment-name", e.g. "mitra-build/scheduled".
        wait_s: how long to give the scheduler after a deploy (it looks at new deployments every 5 s).
        limit: how many runs to return at most.

    Returns:
        Their expected start times, earliest first; empty when the scheduler made none in time.
    """
    deadline = time.monotonic() + wait_s
    with get_client(sync_client=True) as client:
        deployment_id = client.read_deployment_by_name(deployment).id
        while True:
            runs = client.read_flow_runs(
                deployment_filter=DeploymentFilter(id={"any_": [deployment_id]}),
                flow_run_filter=FlowRunFilter(state={"type": {"any_": [StateType.SCHEDULED]}}),
                sort=FlowRunSort.EXPECTED_START_TIME_ASC, limit=limit,
            )
            if runs or time.monotonic() > deadline:
                return [run.expected_start_time for run in runs]
            time.sleep(2)


def main(argv: list[str]) -> int:
    """`python -m mitra_model.pipeline.plumbing upcoming DEPLOYMENT`: print its next runs; exit 1 when there are none,
    which means the server's scheduler is broken (deploy.sh and the demo fail on it)."""
    if len(argv) != 2 or argv[0] != "upcoming":
        print("usage: python -m mitra_model.pipeline.plumbing upcoming FLOW/DEPLOYMENT", file=sys.stderr)
        return 2
    runs = upcoming_runs(argv[1])
    if not runs:
        print(f"!! the Prefect server scheduled no run of {argv[1]} within 30 s of its deploy: its scheduler is "
              "broken; read the server's log (Prefect 3.8 with SQLAlchemy 2.1 fails this way on every tick)",
              file=sys.stderr)
        return 1
    print(f"==> {argv[1]}: next runs " + ", ".join(run.isoformat(timespec="minutes") for run in runs))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
