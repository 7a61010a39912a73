"""Where a person looks in MLflow's UI: links that open the model-training view, and the family's shared view.

MLflow 3's experiment page opens its GenAI layout (traces, evaluations) unless the link asks for the training
view (``workflowType=machine_learning``). A shared view is MLflow's own "share view" feature: the experiment
tag ``mlflow.sharedViewState.<key>`` holds the runs table's state as JSON, and a link with
``viewStateShareKey=<key>`` opens the experiment with it (the columns chosen, every run in the charts). Nothing
here renders; the UI reads the tag.
"""

from __future__ import annotations

import json
import sys
from collections.abc import Iterable
from pathlib import Path
from typing import TYPE_CHECKING

from metaformer_platform.storage.redact import redact

if TYPE_CHECKING:
    from mlflow import MlflowClient

TRAINING_VIEW = "workflowType=machine_learning"
SHARED_VIEW_TAG = "mlflow.sharedViewState."  # + the view's key: MLflow's UI reads it (its SHARE_STATE_TAG_NAME_PREFIX)
# Of the attribute columns MLflow shows by default (Source, Models, Dataset), the one a comparison needs: the
# registered versions (the table is wide; "Source" and "Dataset" push the figures off the screen).
_ATTRIBUTES = ("Models",)


def link(tracking_uri: str, experiment_id: str, run_id: str | None = None, *, view: str | None = None) -> str:
    """A link to the experiment (in the shared ``view`` when given) or to one run, in the training view.

    For a server: its URL (a password in it masked). For a database or a folder: the ``mlflow ui`` command
    that serves it, and the path to open there."""
    path = f"#/experiments/{experiment_id}" + (f"/runs/{run_id}" if run_id else "") + f"?{TRAINING_VIEW}"
    if view:
        path += f"&viewStateShareKey={view}"
    uri = redact(tracking_uri)  # printed: a database password in the URI must not be
    if uri.startswith(("http://", "https://")):
        return f"{uri}/{path}"
    mlflow_cli = Path(sys.executable).parent / "mlflow"
    return f"run `{mlflow_cli} ui --backend-store-uri {uri}` and open http://127.0.0.1:5000/{path}"


def column(kind: str, name: str) -> str:
    """A runs-table column as MLflow's UI names it (its makeCanonicalSortKey): ``metrics.`top1```."""
    return f"{kind}.`{name}`"


def share_view(client: MlflowClient, experiment_id: str, key: str, *, metrics: Iterable[str],
               tags: Iterable[str] = ()) -> None:
    """Store the shared view ``key`` on the experiment: the runs table with these metric and tag columns first,
    in this order, then the registered models; every run (not only the first ten) in the charts. Replaced when
    written again."""
    shown = [column("metrics", m) for m in metrics] + [column("tags", t) for t in tags]
    state = {
        "selectedColumns": [column("attributes", a) for a in _ATTRIBUTES] + shown,
        "columnOrder": shown,  # in the order given, right after the run's name and start (else: by name)
        "runsHiddenMode": "SHOW_ALL",
    }
    client.set_experiment_tag(experiment_id, SHARED_VIEW_TAG + key, json.dumps(state, separators=(",", ":")))
