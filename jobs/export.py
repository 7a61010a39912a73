"""Export a checkpoint of any strategy (ddp, fsdp, deepspeed) to model.safetensors + model.json for plain timm.

    python jobs/export.py ~/metaformer-runs/poolformer_s12-pretrain/checkpoint-00001000 exports/s12
    python jobs/export.py s3://bucket/runs/poolformer_s12-pretrain/checkpoint-00001000 exports/s12-ema --ema
"""

import argparse
import logging
import sys

from metaformer_platform.training.export import export_checkpoint


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("checkpoint", help="a complete checkpoint folder (checkpoint-NNNNNNNN), local or s3://")
    parser.add_argument("out_dir", help="folder to write model.safetensors and model.json into")
    parser.add_argument("--overwrite", action="store_true", help="replace an export already in out_dir")
    parser.add_argument("--ema", action="store_true", help="export the EMA weights (trainer.ema_decay) instead")
    parser.add_argument("--trust-native-checkpoint", action="store_true",
                        help="read an FSDP/DeepSpeed checkpoint without model.safetensors through the strategy's own "
                        "reader, which can run code from the files: only for checkpoints your own runs wrote")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    try:
        result = export_checkpoint(args.checkpoint, args.out_dir, overwrite=args.overwrite, ema=args.ema,
                                   trust_native=args.trust_native_checkpoint)
    except ValueError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    print(f"exported {result.model_name} ({result.num_classes} classes, {result.num_tensors} tensors) to {result.weights}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
