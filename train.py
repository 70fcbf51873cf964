"""Train a detection method (CMDR-IAD by default), one class at a time.

    python train.py --dataset_path D --class_name C [C ...|all] [--model cmdr|cfm|mafr] [--model_option K=V]
        [--modality rgbxyz|rgb|xyz] [--epochs_no 50] [--batch_size 1]
        [--checkpoint_savepath checkpoints/CMDR_IAD_checkpoints] [--preset paper|lite|tiny]
        [--rgb_weights F] [--pointmae_weights F] [--random_init] [--cache_dir DIR] [--device auto|cpu|cuda]
        [--seed 115] [--resume]

Frozen features are computed once per sample and cached; an epoch then costs only the trainable modules. One
loop serves every method: the method gives its named losses and its optimiser groups (CMDR-IAD: one Adam and
one masked cosine loss per module). Checkpoints go to the run folder of (model, modality, seed) with a sidecar
holding the run identity; a folder holding another run's files is never overwritten (the error names the fields
that differ). With ``--resume`` a class whose identical run finished is skipped and an interrupted one continues
from its last completed epoch, with the same result as an uninterrupted run.
"""

from __future__ import annotations

import argparse
import logging
import sys
from collections import defaultdict

import torch
from tqdm import tqdm

from networks.detector import Detector
from networks.detectors import build_detector
from utils.checkpoints import (
    CheckpointError, check_compatible, load_resume_state, module_path, read_sidecar, resume_path, save_modules,
    save_resume_state, sidecar_path, versions,
)
from utils.feature_cache import FeatureCache
from utils.io import InputError
from utils.mvtec3d import Batch, make_dataloader
from utils.pipeline import (
    RunConfig, add_run_arguments, open_split, parse_run_args, prepare_run, run_identity, seed_everything,
    setup_logging, valid_mask,
)

logger = logging.getLogger("train")


def optimisation_step(model: Detector, optimizers: dict[str, torch.optim.Optimizer], cache: FeatureCache,
                      batch: Batch) -> dict[str, float | None]:
    """One step of every optimiser group on ``batch``; returns each loss (None: its group's step was skipped
    because one of the group's losses was not finite)."""
    f2d, f3d = cache.features(batch)
    losses = model.losses(f2d, f3d, valid_mask(batch, f3d, cache.extractor))
    stepping = {name: group.losses or tuple(losses) for name, group in model.optimizer_groups().items()
                if all(torch.isfinite(losses[loss]) for loss in (group.losses or losses))}
    driving = {loss for names in stepping.values() for loss in names}
    for optimizer in optimizers.values():
        optimizer.zero_grad(set_to_none=True)
    if driving:  # the groups' modules are disjoint: one backward gives each the gradient of its own losses
        sum(loss for name, loss in losses.items() if name in driving).backward()
    for name in stepping:
        optimizers[name].step()
    return {name: loss.item() if name in driving else None for name, loss in losses.items()}


def make_optimizers(model: Detector) -> dict[str, torch.optim.Optimizer]:
    """One Adam per optimiser group of the method (CMDR-IAD: per module, lr 1e-3, betas 0.9/0.999)."""
    modules = model.trainable()
    return {name: torch.optim.Adam([p for m in group.modules for p in modules[m].parameters()], lr=group.lr,
                                   betas=group.betas, weight_decay=group.weight_decay)
            for name, group in model.optimizer_groups().items()}


def claim_run_folder(args: tuple, identity: dict, modules: list[str]) -> bool:
    """Whether the finished run in the folder is this very run; an error when the files belong to another.

    Raises:
        CheckpointError: the folder holds a finished run with another identity, or module files of this name
            without a sidecar (e.g. the authors' checkpoints), which training would overwrite.
    """
    sidecar = read_sidecar(*args)
    if sidecar is not None:
        check_compatible(sidecar, identity, sidecar_path(*args))
        return True
    foreign = [p for p in (module_path(args[0], args[1], m, *args[2:]) for m in modules) if p.is_file()]
    if foreign:
        raise CheckpointError(f"{foreign[0].parent} holds checkpoints without a sidecar ({foreign[0].name}, e.g. "
                              "the authors' files): training would overwrite them. Train into another "
                              "--checkpoint_savepath, or move them away")
    return False


def train_class(class_name: str, config: RunConfig, cache: FeatureCache, resume: bool = False
                ) -> dict[str, float] | None:
    """Train the method on one class and write its checkpoints; returns the last epoch's mean losses (None:
    ``resume`` found the identical run finished)."""
    extractor = cache.extractor
    dataset = open_split(extractor, config.dataset_path, class_name, "train", config.modality)
    with torch.device("meta"):  # the method's structure for its identity: no memory, no random numbers drawn
        probe = build_detector(config.model, extractor.config, config.modality, **config.model_options)
    identity = run_identity(extractor, probe, config, dataset)
    args = (config.run_dir, class_name, config.epochs_no, config.batch_size)
    if claim_run_folder(args, identity, list(probe.trainable())) and resume:
        logger.info("%s: already trained (%s), skipped", class_name, sidecar_path(*args))
        return None

    cache.precompute(dataset, config.batch_size)  # features once, before the epochs
    seed_everything(config.seed)
    model = config.build_detector(extractor).train()
    optimizers = make_optimizers(model)
    loader = make_dataloader(dataset, config.batch_size, shuffle=True, seed=config.seed,
                             num_workers=config.num_workers)
    start_epoch = 0
    state_path = resume_path(*args)
    state = load_resume_state(state_path) if resume else None
    if state is not None:
        check_compatible(state["identity"], identity, state_path)
        for name, module in model.trainable().items():
            module.load_state_dict(state["modules"][name])
        for name, optimizer in optimizers.items():
            optimizer.load_state_dict(state["optimizers"][name])
        loader.generator.set_state(state["loader_rng"])
        torch.set_rng_state(state["torch_rng"])
        if torch.cuda.is_available() and state.get("cuda_rng") is not None:
            torch.cuda.set_rng_state_all(state["cuda_rng"])
        start_epoch = state["epoch"]
        logger.info("%s: resuming after epoch %d of %d", class_name, start_epoch, config.epochs_no)

    epoch_losses: dict[str, float] = {}
    for epoch in range(start_epoch, config.epochs_no):
        totals: dict[str, float] = defaultdict(float)
        steps: dict[str, int] = defaultdict(int)
        skipped: dict[str, int] = defaultdict(int)
        progress = tqdm(loader, desc=f"{class_name} epoch {epoch + 1}/{config.epochs_no}", unit="batch", leave=False)
        for batch in progress:
            losses = optimisation_step(model, optimizers, cache, batch)
            for name, loss in losses.items():
                if loss is None:
                    skipped[name] += 1
                else:
                    totals[name] += loss
                    steps[name] += 1
            progress.set_postfix({name: f"{totals[name] / max(steps[name], 1):.4f}" for name in losses})
        for name, count in skipped.items():
            logger.warning("%s epoch %d: %s skipped %d step(s) with a non-finite loss", class_name, epoch + 1, name,
                           count)
        epoch_losses = {name: totals[name] / steps[name] for name in steps}
        logger.info("%s epoch %d/%d: %s", class_name, epoch + 1, config.epochs_no,
                    ", ".join(f"{name} {value:.4f}" for name, value in epoch_losses.items()))
        save_resume_state(state_path, {
            "identity": identity,
            "epoch": epoch + 1,
            "modules": {name: module.state_dict() for name, module in model.trainable().items()},
            "optimizers": {name: optimizer.state_dict() for name, optimizer in optimizers.items()},
            "loader_rng": loader.generator.get_state(),
            "torch_rng": torch.get_rng_state(),
            "cuda_rng": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else None,
        })

    sidecar = {
        **identity,
        "class_name": class_name,
        "preset": config.preset,
        "extractor": extractor.metadata,
        "n_train": len(dataset),
        "final_losses": epoch_losses,
        "dataset_path": str(config.dataset_path),
        "versions": versions(),
    }
    save_modules(model.trainable(), *args, sidecar=sidecar)
    state_path.unlink(missing_ok=True)
    logger.info("%s: checkpoints written to %s", class_name, config.run_dir / class_name)
    return epoch_losses


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_run_arguments(parser, training=True)
    parser.add_argument("--resume", action="store_true",
                        help="skip finished classes and continue interrupted ones from their last completed epoch")
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
    return 0


if __name__ == "__main__":
    sys.exit(main())
