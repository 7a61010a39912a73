"""Evaluation: the metrics (``metrics``) and the evaluate job's report (``report``). Nothing of training."""
