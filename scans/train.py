"""Train the 3D-only scan model (Decoder3D on frozen Point-MAE features of the chunks).

    python -m scans.train --data DATA_DIR --checkpoint FILE [--epochs_no 50] [--batch_size 4]
        [--preset paper|lite|tiny] [--random_init] [--pointmae_weights F] [--device auto|cpu|cuda] [--seed 115]

AdamW (lr 1e-3, weight decay 0.01), masked cosine loss on the non-zero feature rows, shuffled every epoch. The
frozen features of every chunk are computed once and cached in DATA_DIR. Writes FILE (a plain Decoder3D state
dict) and FILE with the suffix .json (the configuration), atomically.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
from pathlib import Path

import torch
from tqdm import tqdm

from networks.features import PRESETS
from networks.methods.cmdr import masked_cosine_loss
from scans.build_dataset import load
from scans.model import build_decoder, build_extractor, chunk_parts
from utils.data.io import InputError, save_torch_atomic, write_text_atomic
from utils.runs.checkpoints import versions
from utils.runs.pipeline import resolve_device, seed_everything, setup_logging

logger = logging.getLogger("scans.train")


def sidecar_of(checkpoint: Path) -> Path:
    return checkpoint.with_suffix(".json")


def add_model_arguments(parser: argparse.ArgumentParser, from_checkpoint: bool = False) -> None:
    """The options shared by scans.train and scans.inference; ``from_checkpoint``: --preset and --random_init
    default to the checkpoint's sidecar."""
    parser.add_argument("--data", type=Path, required=True, help="folder written by scans.build_dataset")
    parser.add_argument("--checkpoint", type=Path, required=True)
    recorded = " (default: the checkpoint's)" if from_checkpoint else ""
    parser.add_argument("--preset", choices=sorted(PRESETS), default=None if from_checkpoint else "paper",
                        help="paper, lite or tiny (docs/features.md ('Presets'))" + recorded)
    parser.add_argument("--random_init", action="store_true", default=None if from_checkpoint else False,
                        help="random (seeded) Point-MAE weights: smoke tests" + recorded)
    parser.add_argument("--pointmae_weights", type=Path)
    parser.add_argument("--device", choices=("auto", "cpu", "cuda"), default="auto")
    parser.add_argument("--cache_dir", type=Path, help="feature cache folder (default: --data)")


def load_data_and_extractor(args: argparse.Namespace):
    """The chunk dataset, its configuration and the frozen extractor sized for it, from the shared options."""
    data, data_config = load(args.data)
    extractor = build_extractor(args.preset, data_config.chunk_size, args.random_init, args.pointmae_weights,
                                resolve_device(args.device), data_config.organised)
    return data, data_config, extractor


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_model_arguments(parser)
    parser.add_argument("--epochs_no", type=int, default=50)
    parser.add_argument("--batch_size", type=int, default=4)
    parser.add_argument("--seed", type=int, default=115)
    args = parser.parse_args(argv)
    setup_logging()
    try:
        data, data_config, extractor = load_data_and_extractor(args)
        train = data.subset("train")
        parts = chunk_parts(extractor, data.chunks[train], args.cache_dir or args.data)
    except InputError as err:  # the data, weights or settings; anything else is a bug: traceback
        logger.error("%s", err)
        return 1
    seed_everything(args.seed)
    decoder = build_decoder(extractor).to(extractor.device).train()
    optimizer = torch.optim.AdamW(decoder.parameters(), lr=1e-3, weight_decay=0.01)
    generator = torch.Generator().manual_seed(args.seed)
    mean_loss = float("nan")
    for epoch in range(args.epochs_no):
        order = torch.randperm(len(parts), generator=generator).tolist()
        losses = []
        for start in tqdm(range(0, len(order), args.batch_size), desc=f"epoch {epoch + 1}/{args.epochs_no}",
                          leave=False):
            f3d = extractor.xyz_maps([parts[i] for i in order[start : start + args.batch_size]])
            loss = masked_cosine_loss(decoder(f3d), f3d, (f3d != 0).any(dim=-1))
            if not torch.isfinite(loss):
                logger.warning("epoch %d: non-finite loss, step skipped", epoch + 1)
                continue
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            losses.append(loss.item())
        mean_loss = sum(losses) / max(len(losses), 1)
        logger.info("epoch %d/%d: loss %.4f", epoch + 1, args.epochs_no, mean_loss)
    save_torch_atomic(args.checkpoint, {k: v.detach().cpu() for k, v in decoder.state_dict().items()})
    sidecar = {"preset": args.preset, "chunk_size": data_config.chunk_size, "random_init": args.random_init,
               "feature_fingerprint": extractor.fingerprint("xyz"), "epochs_no": args.epochs_no,
               "batch_size": args.batch_size, "seed": args.seed, "optimizer": "AdamW lr 1e-3 wd 0.01",
               "final_loss": mean_loss, "n_train": len(parts), "dataset": str(args.data), "versions": versions()}
    write_text_atomic(sidecar_of(args.checkpoint), json.dumps(sidecar, indent=2) + "\n")
    logger.info("checkpoint written to %s", args.checkpoint)
    return 0


if __name__ == "__main__":
    sys.exit(main())
