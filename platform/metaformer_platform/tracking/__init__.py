"""Tracking: the MLflow run handle (``runs``), the model registry (``registry``) and the console's progress lines
(``console``)."""
