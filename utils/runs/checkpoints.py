"""Checkpoints of the trainable modules: the contract's file names, a JSON sidecar, atomic writes, resume state.

Files (docs/training.md), in the run folder :func:`run_folder` gives::

    <run>/<class>/{map2Dto3D,map3Dto2D,Dec2D,Dec3D}_<class>_independent_<E>ep_<B>bs.pth   plain state_dicts
    <run>/<class>/<class>_independent_<E>ep_<B>bs.json                                  sidecar (run identity)
    <run>/<class>/resume_<class>_independent_<E>ep_<B>bs.pth                            while training runs

The run folder is ``<savepath>`` itself for CMDR-IAD's full model with the paper's seed (the authors' layout, so
their checkpoints load unchanged; without a sidecar: a warning, as nothing can be verified) and
``<savepath>/<model>_<modality>_seed<seed>`` for every other method, modality or seed, so that two runs never
share files. The sidecar is written last: a class whose sidecar exists has finished training.
"""

from __future__ import annotations

import json
import logging
import platform
import re
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np
import timm
import torch
from torch import nn

from networks.blocks.memory_bank import MemoryBank
from networks.extractors.point_mae import load_state_dict_checked
from utils.data.io import InputError, save_torch_atomic, write_text_atomic

logger = logging.getLogger(__name__)

CODE_VERSION = "0.1.0"


class CheckpointError(InputError, RuntimeError):
    """Checkpoints are missing, damaged, or belong to another configuration."""


DEFAULT_SEED = 115  # the authors' seed: their checkpoints are a seed-115 run
AUTHORS_LAYOUT = ("cmdr", "rgbxyz", DEFAULT_SEED)  # (model, modality, seed) whose files sit in <savepath>/<class>/


def run_folder(savepath: str | Path, model: str, modality: str, seed: int) -> Path:
    """The folder of one (method, modality, seed): ``savepath`` for the authors' layout, a sub-folder otherwise."""
    if (model, modality, seed) == AUTHORS_LAYOUT:
        return Path(savepath)
    return Path(savepath) / f"{model}_{modality}_seed{seed}"


def checkpoint_stem(class_name: str, epochs: int, batch_size: int) -> str:
    return f"{class_name}_independent_{epochs}ep_{batch_size}bs"


def module_path(savepath: str | Path, class_name: str, module: str, epochs: int, batch_size: int) -> Path:
    return Path(savepath) / class_name / f"{module}_{checkpoint_stem(class_name, epochs, batch_size)}.pth"


def sidecar_path(savepath: str | Path, class_name: str, epochs: int, batch_size: int) -> Path:
    return Path(savepath) / class_name / f"{checkpoint_stem(class_name, epochs, batch_size)}.json"


def resume_path(savepath: str | Path, class_name: str, epochs: int, batch_size: int) -> Path:
    return Path(savepath) / class_name / f"resume_{checkpoint_stem(class_name, epochs, batch_size)}.pth"


def trained_runs(savepath: str | Path, class_name: str) -> list[tuple[int, int]]:
    """(epochs, batch size) of every run of ``class_name`` under ``savepath``: finished sidecars and module files
    (the authors' checkpoints have no sidecar), resume states excluded; sorted."""
    folder = Path(savepath) / class_name
    stem = re.compile(rf"(?:^|_){re.escape(class_name)}_independent_(\d+)ep_(\d+)bs\.(?:json|pth)$")
    runs = set()
    for path in folder.glob("*") if folder.is_dir() else ():
        if not path.name.startswith("resume_") and (match := stem.search(path.name)):
            runs.add((int(match[1]), int(match[2])))
    return sorted(runs)


def runs_in(checkpoint_dir: str | Path, class_name: str) -> list[str]:
    """What finished runs of ``class_name`` lie in ``checkpoint_dir`` (its own and its run folders'), described
    from their sidecars: "cmdr rgbxyz seed 115, lite, 2 epochs, batch 1 (FOLDER)"."""
    root = Path(checkpoint_dir)
    found = []
    for folder in [root, *sorted(p for p in root.iterdir() if p.is_dir())] if root.is_dir() else []:
        for epochs, batch_size in trained_runs(folder, class_name):
            try:
                recorded = read_sidecar(folder, class_name, epochs, batch_size)
            except CheckpointError:
                continue
            if recorded is not None and {"model", "modality", "seed"} <= recorded.keys():
                found.append(f"{recorded['model']} {recorded['modality']} seed {recorded['seed']}, "
                             f"{recorded.get('preset')}, {epochs} epochs, batch {batch_size} ({folder})")
    return found


def select_run(savepath: str | Path, class_name: str, epochs: int | None, batch_size: int | None
               ) -> tuple[int, int]:
    """The (epochs, batch size) of the run to load: the given values, or the only run in the folder that fits.

    Raises:
        CheckpointError: no run fits (with the training command), or several do (listed).
    """
    if epochs is not None and batch_size is not None:
        return epochs, batch_size
    runs = [(e, b) for e, b in trained_runs(savepath, class_name)
            if epochs in (None, e) and batch_size in (None, b)]
    if len(runs) == 1:
        return runs[0]
    folder = Path(savepath) / class_name
    if not runs:
        raise CheckpointError(f"no trained run for {class_name} in {folder}: train it with `python train.py "
                              f"--class_name {class_name} ...` (same --model/--modality/--seed), or point "
                              "--checkpoint_folder at the folder that holds it")
    listed = ", ".join(f"--epochs_no {e} --batch_size {b}" for e, b in runs)
    raise CheckpointError(f"{folder} holds several runs ({listed}): pick one with --epochs_no / --batch_size")


def versions() -> dict[str, str]:
    return {"cmdr_iad": CODE_VERSION, "python": platform.python_version(), "torch": torch.__version__,
            "timm": timm.__version__, "numpy": np.__version__}


def save_modules(modules: Mapping[str, nn.Module], savepath: str | Path, class_name: str, epochs: int,
                 batch_size: int, sidecar: Mapping[str, Any]) -> None:
    """Write every module's state dict, then the sidecar, each atomically. A note of the writing run's identity
    (:func:`writing_path`) stands beside them until the sidecar is written: module files without a sidecar are then
    known to be this run's, stopped while it wrote them, not someone else's."""
    text = json.dumps(dict(sidecar), indent=2, sort_keys=True, default=str) + "\n"
    note = writing_path(savepath, class_name, epochs, batch_size)
    write_text_atomic(note, text)
    for name, module in modules.items():
        save_torch_atomic(module_path(savepath, class_name, name, epochs, batch_size),
                          {k: v.detach().cpu() for k, v in module.state_dict().items()})
    write_text_atomic(sidecar_path(savepath, class_name, epochs, batch_size), text)
    note.unlink()


def writing_path(savepath: str | Path, class_name: str, epochs: int, batch_size: int) -> Path:
    """The note of a run whose checkpoints are being written (its sidecar to be): gone once they are."""
    return sidecar_path(savepath, class_name, epochs, batch_size).with_suffix(".writing.json")


def read_writing_note(savepath: str | Path, class_name: str, epochs: int, batch_size: int) -> dict[str, Any] | None:
    """The sidecar-to-be of a run stopped while writing its checkpoints, or None."""
    path = writing_path(savepath, class_name, epochs, batch_size)
    try:
        return json.loads(path.read_text()) if path.is_file() else None
    except (OSError, json.JSONDecodeError):
        return None


def read_sidecar(savepath: str | Path, class_name: str, epochs: int, batch_size: int) -> dict[str, Any] | None:
    path = sidecar_path(savepath, class_name, epochs, batch_size)
    if not path.is_file():
        return None
    try:
        return json.loads(path.read_text())
    except json.JSONDecodeError as err:
        raise CheckpointError(f"{path}: unreadable sidecar ({err})") from None


def _differences(stored: Any, current: Any, path: str) -> list[str]:
    """Leaf-level differences of two JSON-like values, as 'a.b.c: stored vs current'."""
    if isinstance(stored, dict) and isinstance(current, dict):
        return [d for key in sorted(set(stored) | set(current))
                for d in _differences(stored.get(key), current.get(key), f"{path}.{key}" if path else key)]
    return [] if stored == current else [f"{path}: checkpoint {stored!r} vs now {current!r}"]


def check_compatible(sidecar: Mapping[str, Any], expected: Mapping[str, Any], source: Path) -> None:
    """Fail with the differing fields when a checkpoint was trained for another configuration."""
    def as_json(value: Any) -> Any:  # tuples become lists, as in a JSON sidecar; resume states keep tuples
        return json.loads(json.dumps(value, default=str))

    current = as_json(dict(expected))
    differences = _differences(as_json({k: sidecar.get(k) for k in current}), current, "")
    if differences:
        raise CheckpointError(
            f"{source} belongs to another configuration: " + "; ".join(differences)
            + ". Train for this configuration, or point --checkpoint_folder at the matching checkpoints."
        )


def adopt_recorded_settings(args: Any, recorded: Mapping[str, Any], source: Path | str,
                            defaults: Mapping[str, Any], paths: tuple[str, ...] = ()) -> None:
    """Fill the options a command line left out (None) from a trained run's recorded settings.

    Args:
        args: parsed options (an ``argparse.Namespace``), updated in place.
        recorded: the run's settings by option name (empty for checkpoints without a sidecar).
        source: the sidecar, for messages.
        defaults: option name → value when neither the command line nor the run gives one. An option given with
            another value than the recorded one is an error naming the flag and the recorded value.
        paths: weights-file options, taken from the run when left out but never an error when given: another copy
            of the same weights has another path, and the weights' fingerprints are checked anyway.

    Raises:
        CheckpointError: a given option contradicts the run.
    """
    for name in (*defaults, *paths):
        given, stored = getattr(args, name, None), recorded.get(name)
        if given is None:
            value = stored if stored is not None else defaults.get(name)
            setattr(args, name, Path(value) if name in paths and value is not None else value)
        elif name in defaults and stored is not None and given != stored:
            raise CheckpointError(f"--{name} {given} contradicts the trained run's {name} {stored!r} ({source}): "
                                  f"leave --{name} out to use the run's, or point at a run trained with it")


def load_modules(modules: Mapping[str, nn.Module], savepath: str | Path, class_name: str, epochs: int,
                 batch_size: int, expected: Mapping[str, Any]) -> dict[str, Any] | None:
    """Load the state dicts of ``modules`` after checking the sidecar against ``expected``; returns the sidecar."""
    sidecar = read_sidecar(savepath, class_name, epochs, batch_size)
    source = sidecar_path(savepath, class_name, epochs, batch_size)
    if sidecar is None:
        logger.warning("%s missing: cannot verify that the checkpoints match this configuration", source)
    else:
        check_compatible(sidecar, expected, source)
    for name, module in modules.items():
        path = module_path(savepath, class_name, name, epochs, batch_size)
        if not path.is_file():
            raise CheckpointError(
                f"checkpoint {path} not found: train it with `python train.py --class_name {class_name} "
                f"--epochs_no {epochs} --batch_size {batch_size} ...` (same --model/--modality/--seed) or pass "
                "--checkpoint_folder/--epochs_no/--batch_size of an existing run"
            )
        try:
            state = torch.load(path, map_location="cpu", weights_only=True)
        except Exception as err:
            raise CheckpointError(f"{path}: unreadable checkpoint ({type(err).__name__}: {err})") from None
        if isinstance(module, MemoryBank):  # data-sized: take the stored number of rows
            module.resize_like(state)
        try:
            load_state_dict_checked(module, state, path)
        except RuntimeError as err:
            raise CheckpointError(str(err)) from None
    return sidecar


def save_resume_state(path: Path, state: Mapping[str, Any]) -> None:
    save_torch_atomic(path, dict(state))


def load_resume_state(path: Path) -> dict[str, Any] | None:
    if not path.is_file():
        return None
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:
        logger.warning("%s: unreadable resume state (%s); starting from scratch", path, err)
        return None
