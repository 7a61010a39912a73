"""How much of Ray's own output a job shows: quiet by default, everything with ``--verbose`` (``run.verbose``).

Ray's lines drown the job's own (DESIGN.md: 379 ``PlacementGroupCleaner ... Failed to query Ray Train
Controller actor state`` warnings in one 6-minute demo, a ``TrainingReport(...)`` dump per rank and
checkpoint, token-auth warnings). Each is switched off where Ray emits it, through Ray's own settings:

- worker, controller and helper-actor output reaches the driver only through Ray's log streaming:
  ``ray.init(log_to_driver=False)``. That covers the PlacementGroupCleaner, which polls Ray's state API
  (served by the dashboard, which the local cluster does not start) and warns or dies with a traceback on
  every poll, and has no setting of its own (where no State API is served the jobs now leave it out:
  ``launch.build_trainer``). The job's progress and its workers' warnings reach the driver
  through ``console`` instead;
- the driver's ``ray`` logger (connection, token-auth notices): ``ray.init(logging_level=...)``;
- Ray Train's own INFO records (the per-rank ``Reporting training result N: TrainingReport(...)``, worker
  group start): ``RunConfig(logging_config=LoggingConfig(log_level=...))`` keeps them off the workers'
  console output, which is what a driver attached with ``log_to_driver`` shows (Ray Train still writes
  every level to its own files under /tmp/ray/session_*/logs/train).

Errors still come through: a failed worker's traceback is raised on the driver by ``fit()``, and Ray's own
error reports (a worker killed for memory, say) use a channel that ``log_to_driver`` does not close.
Not covered: the C++ core prints ``network_util.cc ... 8.8.8.8:53`` once while ``ray.init`` works out the
node's address, before any log setting applies.
"""

from __future__ import annotations

import logging
from typing import Any

QUIET_DRIVER_LEVEL = logging.ERROR  # the driver's ``ray`` logger: token-auth and connection notices go
QUIET_TRAIN_LEVEL = "WARNING"  # Ray Train's records: its warnings (slow uploads, restarts) stay


def ray_init_options(verbose: bool) -> dict[str, Any]:
    """Keyword arguments for ``ray.init`` (the driver's connection)."""
    if verbose:
        return {"log_to_driver": True, "logging_level": logging.INFO}
    return {"log_to_driver": False, "logging_level": QUIET_DRIVER_LEVEL}


def train_logging_config(verbose: bool) -> Any:
    """``RunConfig.logging_config``: Ray Train's controller and worker log level."""
    from ray.train import LoggingConfig

    return LoggingConfig(log_level="INFO" if verbose else QUIET_TRAIN_LEVEL)
