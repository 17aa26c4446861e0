"""The study's storage: opening and resuming a study, the trial record, the artifacts."""
