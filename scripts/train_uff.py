"""Train M3DM's Unsupervised Feature Fusion (UFF) once for a whole dataset, as the reference does.

    python -m scripts.train_uff --dataset_path DATA --preset lite --out checkpoints/m3dm_uff_lite.pth
    python train.py --model m3dm --model_option uff=checkpoints/m3dm_uff_lite.pth ...   # the full method

The training patches are every training sample of every class (``--class_names``, default all): the point
patches on the 56² grid and the RGB tokens paired with them — spatially scrambled as the reference's feature dump
pairs them (``--pairs scrambled``, the default: its published numbers were obtained so; defect D1 in
../shared/spec/peers.md) or over the same place (``aligned``, as the UFF is used at test time). The loss is the
reference's patch-wise InfoNCE (:meth:`networks.methods.m3dm.FeatureFusionBlock.contrastive_loss`); the schedule is its
code's: AdamW (β 0.9, 0.95; weight decay 0.01, PyTorch's default, as the reference never passes its flag),
lr 0.003, batches of 16 samples with gradients accumulated over 16 batches, linear warm-up for one epoch and a
half cosine to 0 at epoch 3, seed 0. As in the reference an epoch with fewer batches than ``--accum_iter``
would take no optimiser step: that is refused (lower ``--accum_iter`` or ``--batch_size`` on small data).

Resumable: the state is written after every epoch beside ``--out`` (``.resume``), and a run with the same
settings continues from it; the finished file holds ``{"model": state_dict, ...}`` as the reference's
checkpoints do, and the settings and feature fingerprints it was trained with.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import logging
import sys
from pathlib import Path

import torch
from tqdm import tqdm


from networks.methods.m3dm import FeatureFusionBlock, uff_cosine_schedule, uff_training_pairs
from utils.data.io import save_torch_atomic
from utils.data.mvtec3d import collate_samples
from utils.runs.pipeline import RunConfig, add_feature_arguments, open_split, prepare_run, setup_logging

logger = logging.getLogger("train_uff")

SETTINGS = ("pairs", "epochs", "warmup_epochs", "batch_size", "accum_iter", "lr", "weight_decay", "seed")


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_feature_arguments(parser)
    parser.add_argument("--out", type=Path, required=True, help="the trained UFF file (.pth)")
    parser.add_argument("--pairs", choices=("scrambled", "aligned"), default="scrambled")
    parser.add_argument("--epochs", type=int, default=3)
    parser.add_argument("--warmup_epochs", type=float, default=1.0)
    parser.add_argument("--batch_size", type=int, default=16, help="samples per batch")
    parser.add_argument("--accum_iter", type=int, default=16, help="batches per optimiser step")
    parser.add_argument("--lr", type=float, default=0.003)
    parser.add_argument("--weight_decay", type=float, default=0.01)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    args.modality = "rgbxyz"
    return args


def training_samples(config: RunConfig) -> tuple[list[tuple[str, int]], dict, object]:
    """(class, index) of every training sample, the opened splits and the feature cache (features computed)."""
    class_names, cache = prepare_run(config)
    splits = {name: open_split(cache.extractor, config.dataset_path, name, "train", "rgbxyz") for name in class_names}
    for split in splits.values():
        cache.precompute(split, 1)
    return [(name, i) for name, split in splits.items() for i in range(len(split))], splits, cache


def train_uff(args: argparse.Namespace) -> Path:
    config = RunConfig.from_args(argparse.Namespace(**{**vars(args), "model": "m3dm", "epochs_no": None}))
    samples, splits, cache = training_samples(config)
    extractor = cache.extractor
    batches_per_epoch = len(samples) // args.batch_size  # the reference's loader drops the last partial batch
    if batches_per_epoch < args.accum_iter:
        raise SystemExit(f"{len(samples)} training samples make {batches_per_epoch} batches of {args.batch_size} per "
                         f"epoch, fewer than --accum_iter {args.accum_iter}: no optimiser step would be taken (as in "
                         "the reference). Lower --accum_iter or --batch_size")
    settings = {name: getattr(args, name) for name in SETTINGS}
    identity = {**settings, "extractor_config": extractor.config.to_dict(), "classes": sorted(splits),
                "samples": len(samples),
                "feature_fingerprints": {b: extractor.fingerprint(b) for b in ("rgb", "xyz")}}
    torch.manual_seed(args.seed)
    block = FeatureFusionBlock(extractor.config.xyz_dim, extractor.config.rgb_dim)
    optimizer = torch.optim.AdamW(block.parameters(), lr=args.lr, betas=(0.9, 0.95), weight_decay=args.weight_decay)
    generator = torch.Generator().manual_seed(args.seed)
    resume = args.out.with_name(args.out.name + ".resume")
    start = 0
    if resume.is_file():
        state = torch.load(resume, weights_only=False)
        if state["identity"] != identity:
            raise SystemExit(f"{resume} was written with other settings or features: delete it to start again")
        block.load_state_dict(state["model"])
        optimizer.load_state_dict(state["optimizer"])
        generator.set_state(state["generator"])
        torch.set_rng_state(state["torch_rng"])
        start = state["epoch"]
        logger.info("resuming at epoch %d of %d", start + 1, args.epochs)
    grid = extractor.grid_size
    block.train()
    for epoch in range(start, args.epochs):
        order = torch.randperm(len(samples), generator=generator).tolist()
        losses = []
        optimizer.zero_grad()
        for step in tqdm(range(batches_per_epoch), desc=f"UFF epoch {epoch + 1}/{args.epochs}", unit="batch"):
            if step % args.accum_iter == 0:
                factor = uff_cosine_schedule(step + epoch * batches_per_epoch, batches_per_epoch,
                                             args.warmup_epochs, args.epochs)
                for group in optimizer.param_groups:
                    group["lr"] = args.lr * factor
            chosen = [samples[i] for i in order[step * args.batch_size : (step + 1) * args.batch_size]]
            batch = collate_samples([splits[name][index] for name, index in chosen])
            with torch.no_grad():
                f2d, f3d = cache.features(batch)
            xyz, rgb = uff_training_pairs(f3d.float().cpu(), f2d.float().cpu(), grid, args.pairs)
            loss = block.contrastive_loss(xyz, rgb)
            (loss / args.accum_iter).backward()
            losses.append(loss.item())
            if (step + 1) % args.accum_iter == 0:
                optimizer.step()
                optimizer.zero_grad()
        logger.info("epoch %d: mean loss %.4f", epoch + 1, sum(losses) / len(losses))
        save_torch_atomic(resume, {"identity": identity, "model": block.state_dict(),
                                   "optimizer": optimizer.state_dict(), "generator": generator.get_state(),
                                   "torch_rng": torch.get_rng_state(), "epoch": epoch + 1})
    args.out.parent.mkdir(parents=True, exist_ok=True)
    save_torch_atomic(args.out, {"model": block.state_dict(), "epoch": args.epochs, "identity": identity})
    resume.unlink(missing_ok=True)
    digest = hashlib.sha256(args.out.read_bytes()).hexdigest()[:16]
    logger.info("UFF written to %s (sha256 %s): %s", args.out, digest, json.dumps(settings))
    return args.out


def main(argv: list[str] | None = None) -> int:
    setup_logging()
    train_uff(parse_args(argv))
    return 0


if __name__ == "__main__":
    sys.exit(main())
