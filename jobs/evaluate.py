"""Evaluate trained weights on the validation shards over Ray Train workers: top-1, top-5, per-class top-1,
loss and images/s, written to <run dir>/eval.json and logged to MLflow.

    python jobs/evaluate.py model.init_from=RUN_DIR/checkpoint-NNNNNNNN data.source=s3://bucket/imagenet
    python jobs/evaluate.py model.init_from=models:/poolformer_s12@champion data.source=/data/imagenet-wds
    python jobs/evaluate.py --config jobs/configs/poolformer_s12.yaml model.init_from=exports/s12

The weights decide the model; their training resolution and crop are used unless data.img_size /
data.crop_pct are given. Shards of another label set than the weights' are refused before any worker starts.
"""

import sys

from metaformer_platform.launch.cli import run_main

if __name__ == "__main__":
    sys.exit(run_main("evaluate", __doc__))
