"""Pretrain a MetaFormer on Ray Train.

    python jobs/pretrain.py                                   # embedded default: synthetic data, local Ray
    python jobs/pretrain.py --config jobs/configs/poolformer_s12.yaml trainer.batch_size=64
    ray job submit --working-dir . -- python jobs/pretrain.py --config jobs/configs/poolformer_s12.yaml
"""

import sys
from pathlib import Path

from metaformer_platform.launch.cli import run_main

DEFAULT_CONFIG = Path(__file__).resolve().parent / "configs" / "default.yaml"

if __name__ == "__main__":
    sys.exit(run_main("pretrain", __doc__, default_config=DEFAULT_CONFIG))
