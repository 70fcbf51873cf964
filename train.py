"""Train CMDR-IAD, one class at a time (method.md §3).

    python train.py --dataset_path D --class_name C [C ...|all] [--modality rgbxyz|rgb|xyz] [--epochs_no 50]
        [--batch_size 1] [--checkpoint_savepath checkpoints/CMDR_IAD_checkpoints] [--preset paper|tiny]
        [--rgb_weights F] [--pointmae_weights F] [--random_init] [--cache_dir DIR] [--device auto|cpu|cuda]
        [--seed 115] [--resume]

Frozen features are computed once per sample and cached; an epoch then costs only the trainable modules. Each
module has its own Adam optimiser and its own masked cosine loss. With ``--resume`` a class that finished is
skipped and an interrupted one continues from its last completed epoch, with the same result as an
uninterrupted run.
"""

from __future__ import annotations

import argparse
import logging
import sys
from collections import defaultdict

import torch
from tqdm import tqdm

from networks.cmdr import CMDRIAD
from utils.checkpoints import (
    CheckpointError, check_compatible, load_resume_state, read_sidecar, resume_path, save_modules,
    save_resume_state, sidecar_path, versions,
)
from utils.feature_cache import FeatureCache
from utils.io import DatasetError
from utils.mvtec3d import Batch, make_dataloader
from utils.pipeline import (
    RunConfig, add_run_arguments, model_identity, open_split, parse_run_args, prepare_run, seed_everything,
    setup_logging, valid_mask,
)

logger = logging.getLogger("train")

LEARNING_RATE = 1e-3
BETAS = (0.9, 0.999)


def optimisation_step(model: CMDRIAD, optimizers: dict[str, torch.optim.Optimizer], cache: FeatureCache,
                      batch: Batch) -> dict[str, float | None]:
    """One step of every module on ``batch``; returns each module's loss (None: not finite, step skipped)."""
    f2d, f3d = cache.features(batch)
    losses = model.losses(f2d, f3d, valid_mask(batch, f3d, cache.extractor))
    finite = {name: loss for name, loss in losses.items() if torch.isfinite(loss)}
    for optimizer in optimizers.values():
        optimizer.zero_grad(set_to_none=True)
    if finite:  # the modules are disjoint: one backward gives each module the gradient of its own loss
        sum(finite.values()).backward()
    for name in finite:
        optimizers[name].step()
    return {name: losses[name].item() if name in finite else None for name in losses}


def make_optimizers(model: CMDRIAD) -> dict[str, torch.optim.Optimizer]:
    """One Adam optimiser per module (lr 1e-3, betas 0.9/0.999, no weight decay)."""
    return {name: torch.optim.Adam(module.parameters(), lr=LEARNING_RATE, betas=BETAS, weight_decay=0.0)
            for name, module in model.trainable().items()}


def train_class(class_name: str, config: RunConfig, cache: FeatureCache, resume: bool = False
                ) -> dict[str, float] | None:
    """Train the modules of one class and write their checkpoints; returns the last epoch's mean losses."""
    extractor = cache.extractor
    identity = model_identity(extractor, config.modality)
    args = (config.checkpoint_dir, class_name, config.epochs_no, config.batch_size)
    if resume and (sidecar := read_sidecar(*args)) is not None:
        check_compatible(sidecar, identity, sidecar_path(*args))
        logger.info("%s: already trained (%s), skipped", class_name, sidecar_path(*args))
        return None

    dataset = open_split(extractor, config.dataset_path, class_name, "train", config.modality)
    cache.precompute(dataset, config.batch_size)  # features once, before the epochs

    seed_everything(config.seed)
    model = CMDRIAD(extractor.config, config.modality).to(extractor.device).train()
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
            optimizers[name].load_state_dict(state["optimizers"][name])
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
        "epochs_no": config.epochs_no,
        "batch_size": config.batch_size,
        "seed": config.seed,
        "optimizer": {"name": "Adam", "lr": LEARNING_RATE, "betas": list(BETAS)},
        "n_train": len(dataset),
        "final_losses": epoch_losses,
        "dataset_path": str(config.dataset_path),
        "versions": versions(),
    }
    save_modules(model.trainable(), *args, sidecar=sidecar)
    state_path.unlink(missing_ok=True)
    logger.info("%s: checkpoints written to %s", class_name, config.checkpoint_dir / class_name)
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
    except (DatasetError, CheckpointError, RuntimeError, ValueError) as err:
        logger.error("%s", err)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
