"""The training state inside a checkpoint, without pickles: tensors in safetensors, everything else in JSON.

A shared checkpoint bucket is a trust boundary: whoever can write to it could plant a pickle that runs code when it
is unpickled, and accelerate's `save_state`/`load_state` keep the optimizer, scheduler, RNG states and registered
objects as `torch.save` pickles (`optimizer.bin`, `random_states_0.pkl`, ...). So the loop writes and reads its own
state here; accelerate still prepares the objects. Loading refuses any checkpoint holding a file that is not JSON
or safetensors, and reads the ones it knows with `json` and `safetensors` only (neither can run code).

Files of one checkpoint (the store adds MANIFEST.json):
    weights.safetensors          the trainable weights: the peft adapter when fine-tuning, else the whole model
    optimizer.json + .safetensors   optimizer state_dict: structure as JSON, each tensor by name in safetensors
    scheduler.json, scaler.json  (the grad scaler only with fp16), train.json (TrainState)
    rng-<process>.json + .safetensors   python/numpy RNG (JSON) and torch/cuda RNG (tensors), one per process
Only plain DDP (what `accelerate launch --multi_gpu` prepares) is covered; FSDP/DeepSpeed shard states need
accelerate's collective save, which is pickle-based.
"""

from __future__ import annotations

import json
import random
from pathlib import Path
from typing import Any

import numpy as np
import torch

from pipeline.train.checkpoint import CheckpointError

WEIGHTS = "weights.safetensors"
SAFE_SUFFIXES = (".json", ".safetensors")


class UnsafeCheckpoint(CheckpointError):
    """A checkpoint holds a file that could run code when loaded (a pickle); it is not loaded."""


# ---- a JSON encoding that keeps tensors aside, int dict keys, tuples and numpy arrays ---------------------------


def _encode(obj: Any, tensors: dict[str, torch.Tensor]) -> Any:
    if isinstance(obj, torch.Tensor):
        name = str(len(tensors))
        tensors[name] = obj.detach().to("cpu", copy=True).contiguous()  # a copy: safetensors refuses shared memory
        return {"__tensor__": name}
    if isinstance(obj, np.ndarray):
        return {"__ndarray__": obj.tolist(), "dtype": str(obj.dtype)}
    if isinstance(obj, np.generic):
        return obj.item()
    if isinstance(obj, tuple):
        return {"__tuple__": [_encode(v, tensors) for v in obj]}
    if isinstance(obj, list):
        return [_encode(v, tensors) for v in obj]
    if isinstance(obj, dict):  # optimizer state is keyed by int parameter ids: keep key types
        return {"__dict__": [[_encode(k, tensors), _encode(v, tensors)] for k, v in obj.items()]}
    if obj is None or isinstance(obj, bool | int | float | str):
        return obj
    raise CheckpointError(f"cannot store a {type(obj).__name__} in a checkpoint without pickling it")


def _decode(obj: Any, tensors: dict[str, torch.Tensor]) -> Any:
    if isinstance(obj, list):
        return [_decode(v, tensors) for v in obj]
    if not isinstance(obj, dict):
        return obj
    if "__tensor__" in obj:
        return tensors[obj["__tensor__"]]
    if "__ndarray__" in obj:
        return np.asarray(obj["__ndarray__"], dtype=obj["dtype"])
    if "__tuple__" in obj:
        return tuple(_decode(v, tensors) for v in obj["__tuple__"])
    if "__dict__" in obj:
        return {_decode(k, tensors): _decode(v, tensors) for k, v in obj["__dict__"]}
    raise UnsafeCheckpoint(f"unknown entry {sorted(obj)[:3]} in checkpoint state")


def write_part(folder: Path, name: str, obj: Any) -> None:
    """`obj` as `<name>.json`, its tensors (if any) in `<name>.safetensors`."""
    from safetensors.torch import save_file

    tensors: dict[str, torch.Tensor] = {}
    (folder / f"{name}.json").write_text(json.dumps(_encode(obj, tensors)))
    if tensors:
        save_file(tensors, str(folder / f"{name}.safetensors"))


def read_part(folder: Path, name: str) -> Any:
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    try:
        data = json.loads((folder / f"{name}.json").read_text())
        tensors_file = folder / f"{name}.safetensors"
        tensors = load_file(str(tensors_file)) if tensors_file.exists() else {}
        return _decode(data, tensors)
    except (OSError, ValueError, KeyError, SafetensorError) as err:
        raise CheckpointError(f"{folder}: cannot read {name} ({err})") from err


def refuse_unsafe(folder: Path) -> None:
    """Raise `UnsafeCheckpoint` when a file of the checkpoint is not JSON or safetensors (by name and content)."""
    bad = [
        p.relative_to(folder).as_posix()
        for p in sorted(folder.rglob("*"))
        if p.is_file() and (p.suffix not in SAFE_SUFFIXES or _looks_pickled(p))
    ]
    if bad:
        raise UnsafeCheckpoint(
            f"refusing to resume from {folder}: {', '.join(bad[:5])} may be a pickle (it could run code when "
            "loaded, and checkpoint stores can be shared); only JSON and safetensors files are read. "
            "Delete that checkpoint or re-run with --fresh"
        )


def _looks_pickled(path: Path) -> bool:
    """A pickle starts with the PROTO opcode 0x80; `torch.save` writes a zip ("PK") holding one."""
    with path.open("rb") as f:
        head = f.read(2)
    return head[:1] == b"\x80" or head == b"PK"


# ---- the training state ---------------------------------------------------------------------------------------


def _rng_state() -> dict[str, Any]:
    state: dict[str, Any] = {"python": random.getstate(), "numpy": np.random.get_state()}
    state["torch"] = torch.get_rng_state()
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def _set_rng_state(state: dict[str, Any]) -> None:
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def _weights(acc, model: torch.nn.Module, adapter_only: bool) -> torch.nn.Module | dict[str, torch.Tensor]:
    model = acc.unwrap_model(model)
    if adapter_only:
        from peft import get_peft_model_state_dict

        return {k: v.detach().cpu().contiguous() for k, v in get_peft_model_state_dict(model).items()}
    return model


def save_training(folder: Path, acc, model, optimizer, scheduler, train_state, adapter_only: bool) -> None:
    """Write this process's part of a checkpoint into `folder` (shared by the processes of one node)."""
    from safetensors.torch import save_file, save_model

    write_part(folder, f"rng-{acc.process_index}", _rng_state())
    if not acc.is_main_process:
        return
    weights = _weights(acc, model, adapter_only)
    if isinstance(weights, dict):
        save_file(weights, str(folder / WEIGHTS))
    else:  # save_model handles tied weights (embedding = output layer), which save_file refuses
        save_model(weights, str(folder / WEIGHTS))
    write_part(folder, "optimizer", optimizer.state_dict())
    write_part(folder, "scheduler", scheduler.state_dict())
    if acc.scaler is not None:
        write_part(folder, "scaler", acc.scaler.state_dict())
    write_part(folder, "train", train_state.state_dict())  # last: it records the torch RNG digest


def load_training(folder: Path, acc, model, optimizer, scheduler, train_state, adapter_only: bool) -> None:
    """Restore what `save_training` wrote, on every process; refuses unsafe checkpoints first.

    Raises:
        UnsafeCheckpoint: a file that is not JSON or safetensors (nothing was loaded).
        CheckpointError: a part is missing or unreadable, or the adapter's keys do not match the model.
    """
    from safetensors.torch import load_file, load_model

    refuse_unsafe(folder)
    unwrapped = acc.unwrap_model(model)
    if adapter_only:
        from peft import set_peft_model_state_dict

        result = set_peft_model_state_dict(unwrapped, load_file(str(folder / WEIGHTS)))
        if result.unexpected_keys:
            raise CheckpointError(f"adapter checkpoint has unexpected keys {result.unexpected_keys[:3]}")
    else:
        load_model(unwrapped, str(folder / WEIGHTS), strict=True, device=str(acc.device))
    optimizer.load_state_dict(read_part(folder, "optimizer"))
    scheduler.load_state_dict(read_part(folder, "scheduler"))
    if acc.scaler is not None:
        acc.scaler.load_state_dict(read_part(folder, "scaler"))
    rng_name = f"rng-{acc.process_index}"
    if not (folder / f"{rng_name}.json").exists():
        raise CheckpointError(f"{folder}: no random state for process {acc.process_index} (written by fewer processes)")
    _set_rng_state(read_part(folder, rng_name))
    train_state.load_state_dict(read_part(folder, "train"))  # after the RNG: it checks the RNG digest
