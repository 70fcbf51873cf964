"""Train a detection method (CMDR-IAD by default), one class at a time.

    python train.py --dataset_path D --class_name C [C ...|all] [--model METHOD]
        [--model_option K=V]
        [--modality rgbxyz|rgb|xyz] [--epochs_no 50] [--batch_size 1]
        [--checkpoint_savepath checkpoints/CMDR_IAD_checkpoints] [--preset paper|lite|tiny]
        [--rgb_weights F] [--pointmae_weights F] [--random_init] [--cache_dir DIR] [--device auto|cpu|cuda]
        [--seed 115] [--snapshot_epochs 1] [--snapshot_minutes 10] [--amp] [--activation_checkpointing] [--resume]

Frozen features are computed once per sample and cached; an epoch then costs only the trainable modules. One
loop serves every method: the method gives its named losses and its optimiser groups (CMDR-IAD: one Adam and
one masked cosine loss per module). Checkpoints go to the run folder of (model, modality, seed) with a sidecar
holding the run identity; a folder holding another run's files is never overwritten (the error names the fields
that differ). With ``--resume`` a class whose identical run finished is skipped and an interrupted one continues
from where it stopped, with the same result as an uninterrupted run. The training state is saved after every
``--snapshot_epochs`` epochs (default: every one), every ``--snapshot_minutes`` inside an epoch, and at Ctrl-C
(which lets the current step finish first, then prints the command that continues).
"""

from __future__ import annotations

import argparse
import logging
import math
import shlex
import signal
import sys
import threading
import time
from collections import defaultdict
from dataclasses import dataclass, field
from pathlib import Path

import torch
from tqdm import tqdm

from networks.blocks.activation_checkpointing import set_activation_checkpointing
from networks.methods.detector import Detector, MemoryBankDetector
from networks.methods.registry import build_detector
from utils.data.io import InputError
from utils.data.mvtec3d import MVTec3DDataset, make_dataloader
from utils.runs.checkpoints import (
    CheckpointError, check_compatible, load_resume_state, module_path, read_sidecar, read_writing_note, resume_path,
    save_modules, save_resume_state, sidecar_path, versions, writing_path,
)
from utils.runs.feature_cache import FeatureCache
from utils.runs.pipeline import (
    RunConfig, add_run_arguments, autocast, open_split, parse_run_args, prepare_run, run_identity,
    seed_everything, setup_logging, valid_mask,
)
from utils.runs.training_set import TrainingSet, index_loader

logger = logging.getLogger("train")

INTERRUPTED_EXIT = 130  # the shell's exit status for Ctrl-C


def optimisation_step(model: Detector, optimizers: dict[str, torch.optim.Optimizer], f2d: torch.Tensor | None,
                      f3d: torch.Tensor | None, mask: torch.Tensor, amp: bool = False) -> dict[str, float | None]:
    """One step of every optimiser group on a batch's features (F2D, F3D, valid mask: :class:`TrainingSet`);
    returns each loss (None: its group's step was skipped because one of the group's losses was not finite).
    ``amp``: the forward pass under bf16 autocast (the weights, gradients and optimiser states stay fp32; bf16 has
    fp32's range, so no loss scaling)."""
    device = (f2d if f2d is not None else f3d).device
    with autocast(device, amp):
        losses = {name: loss.float() for name, loss in model.losses(f2d, f3d, mask).items()}
    # The step's one host synchronisation: every loss value at once (they decide which groups step, and are logged)
    values = dict(zip(losses, torch.stack([loss.detach() for loss in losses.values()]).tolist()))
    stepping = {name: group.losses or tuple(losses) for name, group in model.optimizer_groups().items()
                if all(math.isfinite(values[loss]) for loss in (group.losses or losses))}
    driving = {loss for names in stepping.values() for loss in names}
    for optimizer in optimizers.values():
        optimizer.zero_grad(set_to_none=True)
    if driving:  # the groups' modules are disjoint: one backward gives each the gradient of its own losses
        sum(loss for name, loss in losses.items() if name in driving).backward()
    for name in stepping:
        optimizers[name].step()
    return {name: values[name] if name in driving else None for name in losses}


def make_optimizers(model: Detector) -> dict[str, torch.optim.Optimizer]:
    """One Adam per optimiser group of the method (CMDR-IAD: per module, lr 1e-3, betas 0.9/0.999); PyTorch's
    fused implementation on CPU and CUDA (one kernel for all parameters: lite's four steps took 4.3 ms, now 0.8)."""
    modules = model.trainable()
    groups = {name: [p for m in group.modules for p in modules[m].parameters()]
              for name, group in model.optimizer_groups().items()}
    fused = all(p.device.type in ("cpu", "cuda") for parameters in groups.values() for p in parameters)
    return {name: torch.optim.Adam(groups[name], lr=group.lr, betas=group.betas, weight_decay=group.weight_decay,
                                   fused=fused)
            for name, group in model.optimizer_groups().items()}


@dataclass(frozen=True)
class TrainingPosition:
    """Where training stands: ``step`` batches of epoch ``epoch`` (0-based) done, the loader's generator state at
    the start of that epoch (it decides the epoch's order), and the epoch's running loss sums."""

    epoch: int
    step: int
    loader_rng: torch.Tensor
    running: dict = field(default_factory=dict)


class TrainingInterrupted(Exception):
    """Training stopped by Ctrl-C after its state was saved."""

    def __init__(self, class_name: str, state_path: Path, position: TrainingPosition, saved: bool = True) -> None:
        where = f"{class_name}: interrupted at epoch {position.epoch + 1}, step {position.step}"
        if saved:
            message = f"{where}; state saved to {state_path}"
        elif state_path.is_file():
            message = f"{where}, stopped at once; the last saved state in {state_path} is kept"
        else:
            message = f"{where}, stopped at once before any state was saved"
        super().__init__(message)
        self.state_path = state_path


class FitInterrupted(TrainingInterrupted):
    """A memory-bank fit stopped by Ctrl-C: nothing was written (a fit is one pass; it restarts from the start)."""

    def __init__(self, class_name: str) -> None:
        Exception.__init__(self, f"{class_name}: fit interrupted, nothing written (a fit starts again from the "
                                 "beginning)")


class DeferredInterrupt:
    """Within the block, Ctrl-C (SIGINT) only sets ``requested``: the training loop stops after the current step,
    so the saved state is consistent. A second Ctrl-C stops at once. Only in the main thread (signals)."""

    def __enter__(self) -> DeferredInterrupt:
        self.requested = False
        self.forced = False  # a second Ctrl-C: the step may be half done, its state must not be saved
        self._previous = None
        if threading.current_thread() is threading.main_thread():
            self._previous = signal.signal(signal.SIGINT, self._handle)
        return self

    def _handle(self, signum: int, frame: object) -> None:
        if self.requested:
            self.forced = True
            raise KeyboardInterrupt
        self.requested = True
        logger.warning("Ctrl-C: stopping after this step and saving the training state (again: stop at once)")

    def __exit__(self, *exc: object) -> None:
        if self._previous is not None:
            signal.signal(signal.SIGINT, self._previous)


def _rng_states() -> tuple[torch.Tensor, list | None]:
    """The global torch (and CUDA) random states: dropout draws from them."""
    return torch.get_rng_state(), torch.cuda.get_rng_state_all() if torch.cuda.is_available() else None


def claim_run_folder(args: tuple, identity: dict, modules: list[str]) -> bool:
    """Whether the finished run in the folder is this very run; an error when the files belong to another.

    Module files without a sidecar are this run's own when its writing note says so (it was stopped while it wrote
    them, :func:`utils.runs.checkpoints.save_modules`); otherwise someone else's.

    Raises:
        CheckpointError: the folder holds a finished run with another identity, or module files of this name
            without a sidecar (e.g. the authors' checkpoints), which training would overwrite.
    """
    sidecar = read_sidecar(*args)
    if sidecar is not None:
        check_compatible(sidecar, identity, sidecar_path(*args))
        return True
    foreign = [p for p in (module_path(args[0], args[1], m, *args[2:]) for m in modules) if p.is_file()]
    note = read_writing_note(*args) if foreign else None
    if note is not None:
        check_compatible(note, identity, writing_path(*args))
        return False  # this very run, stopped while it wrote its checkpoints: its own files, written again
    if foreign:
        raise CheckpointError(f"{foreign[0].parent} holds checkpoints without a sidecar ({foreign[0].name}, e.g. "
                              "the authors' files): training would overwrite them. Train into another "
                              "--checkpoint_savepath, or move them away")
    return False


def train_class(class_name: str, config: RunConfig, cache: FeatureCache, resume: bool = False
                ) -> dict[str, float] | None:
    """Train (or, for a memory-bank method, fit) the method on one class and write its checkpoints; returns the
    last epoch's mean losses or the fit's statistics (None: ``resume`` found the identical run finished)."""
    extractor = cache.extractor
    dataset = open_split(extractor, config.dataset_path, class_name, "train", config.modality)
    with torch.device("meta"):  # the method's structure for its identity: no memory, no random numbers drawn
        probe = build_detector(config.model, extractor.config, config.modality, **config.model_options)
    identity = run_identity(extractor, probe, config, dataset)
    args = (config.run_dir, class_name, config.epochs_no, config.batch_size)
    if claim_run_folder(args, identity, list(probe.trainable())) and resume:
        logger.info("%s: already trained (%s), skipped", class_name, sidecar_path(*args))
        return None

    if isinstance(probe, MemoryBankDetector):
        cache.precompute(dataset, config.batch_size)  # features once: the fit reads them in its one pass
    else:
        training_set = TrainingSet(cache, dataset, config.batch_size)  # features once, held for the epochs
    seed_everything(config.seed)
    model = config.build_detector(extractor).train()
    if config.activation_checkpointing and not set_activation_checkpointing(model, True):
        logger.warning("%s has no module with activation checkpointing: --activation_checkpointing changes nothing",
                       config.model)
    if isinstance(model, MemoryBankDetector):
        outcome = {"fit": fit_memory_bank(model, class_name, config, cache, dataset)}
    else:
        outcome = {"final_losses": train_epochs(model, class_name, config, training_set, identity, resume)}
        finished = model.eval().finish_training(training_set.batches(config.batch_size))
        if finished:  # e.g. cmdr's per-pixel statistics of the training maps
            outcome["after_training"] = finished
            logger.info("%s after training: %s", class_name, finished)

    sidecar = {
        **identity,
        "class_name": class_name,
        "preset": config.preset,
        "model_option": config.model_option,  # as given: the predictor rebuilds the method from them
        "extractor": extractor.metadata,
        "n_train": len(dataset),
        **outcome,
        "dataset_path": str(config.dataset_path),
        "versions": versions(),
    }
    save_modules(model.trainable(), *args, sidecar=sidecar)
    resume_path(*args).unlink(missing_ok=True)
    logger.info("%s: checkpoints written to %s", class_name, config.run_dir / class_name)
    return next(iter(outcome.values()))


def fit_memory_bank(model: MemoryBankDetector, class_name: str, config: RunConfig, cache: FeatureCache,
                    dataset: MVTec3DDataset) -> dict[str, float]:
    """Fit a memory-bank method in one pass over the training split (no epochs, no optimiser); returns its
    statistics (bank sizes), which go to the sidecar."""
    loader = make_dataloader(dataset, config.batch_size, shuffle=False, num_workers=config.num_workers)

    def batches():
        for batch in tqdm(loader, desc=f"{class_name} fit", unit="batch", leave=False):
            f2d, f3d = cache.features(batch)
            yield f2d, f3d, valid_mask(batch, f3d, cache.extractor), batch.xyz

    try:
        with torch.no_grad():
            statistics = model.fit(batches())
    except KeyboardInterrupt:
        raise FitInterrupted(class_name) from None
    logger.info("%s fitted: %s", class_name, ", ".join(f"{k} {v:.4g}" for k, v in statistics.items()))
    return statistics


def train_epochs(model: Detector, class_name: str, config: RunConfig, training_set: TrainingSet, identity: dict,
                 resume: bool) -> dict[str, float]:
    """The epochs of a gradient-trained method, resumable; returns the last epoch's mean losses.

    Raises:
        TrainingInterrupted: Ctrl-C, after the state was saved.
    """
    args = (config.run_dir, class_name, config.epochs_no, config.batch_size)
    optimizers = make_optimizers(model)
    loader = index_loader(len(training_set), config.batch_size, shuffle=True, seed=config.seed)
    state_path = resume_path(*args)
    state = load_resume_state(state_path) if resume else None
    position = TrainingPosition(0, 0, loader.generator.get_state())
    if state is not None:
        check_compatible(state["identity"], identity, state_path)
        for name, module in model.trainable().items():
            module.load_state_dict(state["modules"][name])
        for name, optimizer in optimizers.items():
            optimizer.load_state_dict(state["optimizers"][name])
        position = TrainingPosition(state["epoch"], state.get("step", 0), state["loader_rng"],
                                    state.get("running", {}))
        torch.set_rng_state(state["torch_rng"])
        if torch.cuda.is_available() and state.get("cuda_rng") is not None:
            torch.cuda.set_rng_state_all(state["cuda_rng"])
        logger.info("%s: resuming at epoch %d, step %d (of %d epochs)", class_name, position.epoch + 1,
                    position.step, config.epochs_no)

    def snapshot(at: TrainingPosition, rng: tuple[torch.Tensor, list | None]) -> None:
        save_resume_state(state_path, {
            "identity": identity,
            "epoch": at.epoch,
            "step": at.step,
            "loader_rng": at.loader_rng,
            "running": at.running,
            "modules": {name: module.state_dict() for name, module in model.trainable().items()},
            "optimizers": {name: optimizer.state_dict() for name, optimizer in optimizers.items()},
            "torch_rng": rng[0],
            "cuda_rng": rng[1],
        })

    epoch_losses: dict[str, float] = {}
    last_snapshot = time.monotonic()
    rng = _rng_states()
    with DeferredInterrupt() as interrupt:
        try:
            for epoch in range(position.epoch, config.epochs_no):  # position: the start of this epoch, or a
                loader.generator.set_state(position.loader_rng)   # resumed step inside it
                totals = defaultdict(float, position.running.get("totals", {}))
                steps = defaultdict(int, position.running.get("steps", {}))
                skipped = defaultdict(int, position.running.get("skipped", {}))
                batches = iter(loader)  # draws the epoch's order from the loader's generator
                for _ in range(position.step):  # steps done before the interruption
                    next(batches)
                progress = tqdm(batches, desc=f"{class_name} epoch {epoch + 1}/{config.epochs_no}", unit="batch",
                                leave=False, initial=position.step, total=len(loader))
                for indices in progress:
                    losses = optimisation_step(model, optimizers, *training_set.features(indices), config.amp)
                    for name, loss in losses.items():
                        if loss is None:
                            skipped[name] += 1
                        else:
                            totals[name] += loss
                            steps[name] += 1
                    progress.set_postfix({name: f"{totals[name] / max(steps[name], 1):.4f}" for name in losses})
                    rng = _rng_states()
                    position = TrainingPosition(epoch, position.step + 1, position.loader_rng, {
                        "totals": dict(totals), "steps": dict(steps), "skipped": dict(skipped)})
                    if interrupt.requested:
                        raise KeyboardInterrupt
                    if time.monotonic() - last_snapshot >= config.snapshot_minutes * 60 and \
                            position.step < len(loader):
                        snapshot(position, rng)
                        last_snapshot = time.monotonic()
                for name, count in skipped.items():
                    logger.warning("%s epoch %d: %s skipped %d step(s) with a non-finite loss", class_name,
                                   epoch + 1, name, count)
                epoch_losses = {name: totals[name] / steps[name] for name in steps}
                logger.info("%s epoch %d/%d: %s", class_name, epoch + 1, config.epochs_no,
                            ", ".join(f"{name} {value:.4f}" for name, value in epoch_losses.items()))
                position = TrainingPosition(epoch + 1, 0, loader.generator.get_state())
                # every N-th epoch; never after the last one: the checkpoints are written next
                if epoch + 1 < config.epochs_no and (epoch + 1) % config.snapshot_epochs == 0:
                    snapshot(position, rng)
                    last_snapshot = time.monotonic()
        except KeyboardInterrupt:
            if not interrupt.forced:
                snapshot(position, rng)  # the state after the last finished step
            raise TrainingInterrupted(class_name, state_path, position, saved=not interrupt.forced) from None

    return epoch_losses


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_run_arguments(parser, training=True)
    parser.add_argument("--resume", action="store_true",
                        help="skip finished classes and continue interrupted ones where their saved state stands")
    args = parse_run_args(parser, argv)
    setup_logging()
    config = RunConfig.from_args(args)
    try:
        class_names, cache = prepare_run(config)
        for class_name in class_names:
            train_class(class_name, config, cache, resume=args.resume)
    except InputError as err:  # the user's data, files or settings; anything else is a bug: traceback
        logger.error("%s", err)
        return 1
    except TrainingInterrupted as err:
        logger.warning("%s. Continue with: %s", err, resume_command("train.py", sys.argv[1:] if argv is None else argv))
        return INTERRUPTED_EXIT
    return 0


def resume_command(script: str, argv: list[str]) -> str:
    """The command line that continues an interrupted run: the same options plus ``--resume``."""
    return shlex.join(["python", script, *argv, *([] if "--resume" in argv else ["--resume"])])


if __name__ == "__main__":
    sys.exit(main())
