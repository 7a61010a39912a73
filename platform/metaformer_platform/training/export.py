"""Export: any strategy's checkpoint folder -> ``model.safetensors`` + ``model.json`` for plain timm.

The export holds the full fp32 weights under timm's own parameter names, so
``timm.create_model(name, num_classes=n).load_state_dict(load_file("model.safetensors"), strict=True)`` works in
one process, with no process group and without the training strategy (DeepSpeed) installed. Reading an export
never unpickles anything (safetensors + JSON), and neither does writing one: a checkpoint's weights are read
from its pickle-free copy (``checkpoint_format.model_weights``: FSDP2/DeepSpeed's ``model.safetensors``, DDP's
``model.pt`` with ``weights_only``), never from the strategy's native files, which can run code, unless the
checkpoint lacks that copy and its marker is signed with the deployment key (``checkpoint_format.verify_native``),
or ``trust_native=True`` (``jobs/export.py --trust-native-checkpoint``: your own run's older, unsigned
checkpoints), which says so loudly. An export folder gets its own signed ``COMPLETE`` marker (its two files,
sizes and sha256), and its ``model.json`` may set only architecture kwargs (``weights.check_model_kwargs``).
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from metaformer_platform.storage import Location
from metaformer_platform.storage import checkpoint_format as fmt
from metaformer_platform.storage.weights import check_folder, check_model_kwargs


@dataclass(frozen=True)
class Export:
    """Where an export was written and what it holds."""

    weights: Path | str  # a local path, or the s3:// URI the export was uploaded to
    meta: Path | str
    model_name: str
    num_classes: int
    num_tensors: int


def _read_checkpoint_info(directory: Path) -> tuple[dict[str, Any], dict[str, Any]]:
    """(trainer state, job config as a dict) of a complete checkpoint, or a ValueError saying why not."""
    if not directory.is_dir():
        raise ValueError(f"{str(directory)!r} is not a folder: export needs a checkpoint folder")
    missing = [n for n in (fmt.COMPLETE_MARKER, fmt.TRAINER_FILE, fmt.CONFIG_FILE) if not (directory / n).is_file()]
    if missing:
        raise ValueError(
            f"{str(directory)!r} is not a complete checkpoint (missing {', '.join(missing)}): point export at a "
            "run's checkpoint-NNNNNNNN folder"
        )
    if (why := fmt.incomplete_reason(directory)) is not None:  # sizes and sha256 digests
        raise ValueError(f"{str(directory)!r} is not a complete checkpoint ({why})")
    return fmt.read_checkpoint_info(directory)


def _reference_model(name: str, num_classes: int, kwargs: dict[str, Any]) -> torch.nn.Module:
    """The plain timm model the export must load into (built on the meta device: no memory, no time)."""
    from metaformer_platform.models import create_model

    with torch.device("meta"):
        return create_model(name, num_classes=num_classes, **kwargs)


def export_checkpoint(
    directory: str | os.PathLike[str], out_dir: str | os.PathLike[str], *, overwrite: bool = False, ema: bool = False,
    trust_native: bool = False,
) -> Export:
    """Consolidate the checkpoint in ``directory`` (any strategy; a local folder or s3://) into ``out_dir``.

    ``ema=True`` exports the checkpoint's EMA weights instead of the trained ones. Raises ``ValueError`` for
    a folder that is not a complete checkpoint (a file changed since it was written included), weights that
    do not match the model named in it, weights only in a format that can run code (unless ``trust_native``:
    the strategy's own reader, for checkpoints you wrote yourself), an EMA asked of a checkpoint without one,
    or an existing export in ``out_dir`` (unless ``overwrite``). ``out_dir`` may be on s3:// too (written
    locally, then uploaded: the metadata file last).
    """
    import tempfile

    from metaformer_platform import storage

    target = storage.check_access(out_dir, what=f"export destination {str(out_dir)!r}")
    if not overwrite and (storage.exists(target.join(fmt.WEIGHTS_FILE)) or storage.exists(target.join(fmt.META_FILE))):
        raise ValueError(f"{target.uri!r} already holds an export; choose another folder or pass overwrite=True")
    source = Location.parse(directory)
    src = source.path if not source.remote else storage.weights.resolve(source.uri)  # fetched once, cached
    if not target.remote:
        return _export(src, target.path, ema=ema, source=source.uri if source.remote else str(src),
                       trust_native=trust_native)
    with tempfile.TemporaryDirectory(prefix="export-") as tmp:
        done = _export(src, Path(tmp), ema=ema, source=source.uri, trust_native=trust_native)
        # model.json after the weights, the marker last: a reader that sees it sees the whole export
        for name in (fmt.WEIGHTS_FILE, fmt.META_FILE, fmt.COMPLETE_MARKER):
            storage.write_bytes(target.join(name), (Path(tmp) / name).read_bytes())
    return Export(target.join(fmt.WEIGHTS_FILE).uri, target.join(fmt.META_FILE).uri, done.model_name,
                  done.num_classes, done.num_tensors)


def _export(src: Path, out: Path, *, ema: bool, source: str, trust_native: bool = False) -> Export:
    state, config = _read_checkpoint_info(src)
    weights, meta = out / fmt.WEIGHTS_FILE, out / fmt.META_FILE
    name, num_classes = state["model_name"], int(state["num_classes"])
    strategy = config.get("strategy", {}).get("name", "ddp")
    model_kwargs = check_model_kwargs(config.get("model", {}).get("kwargs"), f"the checkpoint {source!r}")
    if ema:
        if not (src / fmt.EMA_FILE).is_file():
            raise ValueError(
                f"{source!r} holds no EMA ({fmt.EMA_FILE}): it was trained with trainer.ema_decay=null; "
                "export it without --ema"
            )
        tensors = fmt.load_tensors(src / fmt.EMA_FILE)  # full fp32 weights for every strategy
    elif not (src / fmt.WEIGHTS_FILE).is_file() and (trust_native or fmt.native_refusal(src) is None):
        from metaformer_platform.strategies import get_strategy_class

        # signed with the deployment key (or, unsigned, vouched for by the caller: said loudly), all files as signed
        fmt.verify_native(src, accept_unsigned=trust_native, what=f"exporting {source}")
        tensors = get_strategy_class(strategy).consolidate(src)
    else:
        tensors = fmt.model_weights(src)  # pickle-free, whatever the strategy

    reference = _reference_model(name, num_classes, model_kwargs)
    expected = {k: tuple(v.shape) for k, v in reference.state_dict().items()}
    got = {k: tuple(v.shape) for k, v in tensors.items()}
    if expected != got:
        missing, extra = sorted(expected.keys() - got.keys()), sorted(got.keys() - expected.keys())
        shapes = sorted(k for k in expected.keys() & got.keys() if expected[k] != got[k])
        raise ValueError(
            f"the {strategy} checkpoint in {str(src)!r} does not match {name} with {num_classes} classes: "
            f"missing {missing[:8]}, unexpected {extra[:8]}, wrong shape {shapes[:8]}"
        )

    out.mkdir(parents=True, exist_ok=True)
    info = {
        "model_name": name,
        "num_classes": num_classes,
        "model_kwargs": model_kwargs,
        "pretrained_cfg": {**(getattr(reference, "pretrained_cfg", None) or {}), "num_classes": num_classes},
        "img_size": config.get("data", {}).get("img_size"),
        "crop_pct": config.get("data", {}).get("crop_pct"),
        "class_names": list(state.get("class_names") or []),  # label i is class_names[i] (empty: unrecorded)
        "step": int(state["step"]),
        "strategy": strategy,
        "weights": "ema" if ema else "trained",
        "source": source,
    }
    fmt.save_weights(tensors, weights, metadata={"model_name": name, "num_classes": str(num_classes)})
    tmp_meta = meta.with_name(f".{meta.name}.tmp-{os.getpid()}")
    tmp_meta.write_text(json.dumps(info, indent=2, default=str) + "\n")
    os.replace(tmp_meta, meta)
    fmt.mark_complete(out, [fmt.describe_files(out, [fmt.WEIGHTS_FILE, fmt.META_FILE])])
    return Export(weights, meta, name, num_classes, len(tensors))


def load_export(out_dir: str | os.PathLike[str]) -> torch.nn.Module:
    """A plain timm model (fp32, CPU, eval mode) with the exported weights loaded strictly."""
    import timm

    import metaformer_platform.models  # noqa: F401  (registers the platform's extra timm names)

    folder = Path(out_dir).expanduser()
    if not (folder / fmt.WEIGHTS_FILE).is_file() or not (folder / fmt.META_FILE).is_file():
        raise ValueError(f"{str(folder)!r} is not an export (needs {fmt.WEIGHTS_FILE} and {fmt.META_FILE})")
    check_folder(folder, repr(str(folder)))
    info = json.loads((folder / fmt.META_FILE).read_text())
    kwargs = check_model_kwargs(info.get("model_kwargs"), f"{str(folder)!r} (its {fmt.META_FILE})")
    model = timm.create_model(info["model_name"], num_classes=info["num_classes"], **kwargs)
    model.load_state_dict(fmt.load_weights(folder / fmt.WEIGHTS_FILE), strict=True)
    return model.eval()


def read_weights(source: str | os.PathLike[str]) -> tuple[dict[str, torch.Tensor], str]:
    """Full fp32 weights and the model name from an export folder or a checkpoint folder of any strategy
    (local, or s3:// fetched once into the weights cache). Pickle-free reads only: an export's safetensors, or a
    checkpoint's ``model_weights`` (whatever strategy its config.yaml names: that file comes with the weights
    and must not pick a reader that runs code)."""
    from metaformer_platform.storage.weights import resolve

    loc = Location.parse(source)
    folder = resolve(loc.uri) if loc.remote else loc.path
    if folder.is_dir():
        check_folder(folder, repr(str(source)))  # strict marker first: an added file never changes the kind
    is_checkpoint = (folder / fmt.COMPLETE_MARKER).is_file() and (folder / fmt.TRAINER_FILE).is_file()
    if not is_checkpoint and (folder / fmt.WEIGHTS_FILE).is_file() and (folder / fmt.META_FILE).is_file():
        return fmt.load_weights(folder / fmt.WEIGHTS_FILE), json.loads((folder / fmt.META_FILE).read_text())["model_name"]
    state, _ = _read_checkpoint_info(folder)  # ValueError: neither an export nor a complete checkpoint
    return fmt.model_weights(folder), state["model_name"]


def init_from(model: torch.nn.Module, source: str | os.PathLike[str]) -> list[str]:
    """Load the weights in ``source`` into ``model``; a classifier of another size is left as initialised.

    Returns the keys left as they were (the new head). Any other missing, unexpected or misshapen key is a
    ``ValueError`` that names the keys: the weights belong to another model.
    """
    weights, _ = read_weights(source)
    own = model.state_dict()
    classifier = str((getattr(model, "pretrained_cfg", None) or {}).get("classifier") or "")
    new_head = sorted(
        k for k in own
        if classifier and k.startswith(classifier + ".") and k in weights and weights[k].shape != own[k].shape
    )
    weights = {k: v for k, v in weights.items() if k not in new_head}
    missing = sorted(own.keys() - weights.keys() - set(new_head))
    unexpected = sorted(weights.keys() - own.keys())
    misshapen = sorted(k for k in own.keys() & weights.keys() if own[k].shape != weights[k].shape)
    if missing or unexpected or misshapen:
        raise ValueError(
            f"model.init_from={str(source)!r} does not fit {type(model).__name__}: missing {missing[:8]}, "
            f"unexpected {unexpected[:8]}, wrong shape {misshapen[:8]}; use weights of the same model.name"
        )
    model.load_state_dict(weights, strict=False)
    return new_head
