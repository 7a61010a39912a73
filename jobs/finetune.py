"""Fine-tune a MetaFormer from trained weights on Ray Train: same or new label set (a new head), same or new
resolution.

    python jobs/finetune.py model.init_from=RUN_DIR/checkpoint-NNNNNNNN data.source=s3://bucket/imagenet
    python jobs/finetune.py model.init_from=models:/poolformer_s12@champion          # the 384 px recipe
    python jobs/finetune.py --config jobs/configs/finetune_transfer.yaml model.init_from=exports/s12 \\
        data.source=/data/flowers-wds                                                # a new head

model.init_from is a checkpoint folder of any strategy, an export folder (jobs/export.py) or a registered
model (models:/NAME@ALIAS or models:/NAME/VERSION, resolved on the driver before any worker starts).
"""

import sys
from pathlib import Path

from metaformer_platform.launch.cli import run_main

DEFAULT_CONFIG = Path(__file__).resolve().parent / "configs" / "finetune_384.yaml"

if __name__ == "__main__":
    sys.exit(run_main("finetune", __doc__, default_config=DEFAULT_CONFIG))
