"""Running a search: the coordinator loop, the trial stages, the worker pool, progress."""
