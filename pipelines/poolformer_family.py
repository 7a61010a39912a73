"""The PoolFormer family pipeline: every size (S12, S24, S36, M36, M48) through pretrain -> finetune -> evaluate,
then the registry's promotion gate and a family report (see pipelines/poolformer_family.yaml).

    python pipelines/poolformer_family.py --dry-run                  # the plan: what would run, resume or skip
    ray job submit --working-dir . -- python pipelines/poolformer_family.py
    python pipelines/poolformer_family.py --pipeline pipelines/metaformer_baselines.yaml data.source=s3://...
"""

import sys
from pathlib import Path

from metaformer_platform.pipelines import main

DEFAULT_PIPELINE = Path(__file__).resolve().parent / "poolformer_family.yaml"

if __name__ == "__main__":
    sys.exit(main(default_pipeline=DEFAULT_PIPELINE))
