"""The Prefect pipeline (the `[flow]` extra): `flow` reads as the pipeline, each task a thin wrapper
over one library function; `plumbing` holds what Prefect needs besides (the log bridge, UI
artifacts, run tags, locks, result storage, the schedule check)."""
