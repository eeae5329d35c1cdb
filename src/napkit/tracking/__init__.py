"""Experiment tracking in MLflow: one run per pipeline execution, shared by all its stages."""

from napkit.tracking.mlflow_run import StageTracker, repo_root, stage_run, tracking_uri

__all__ = ["StageTracker", "repo_root", "stage_run", "tracking_uri"]
