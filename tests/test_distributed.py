"""The reproduction runner on Ray: the same numbers as the local engine, a failing task reported while the others
finish, and the feature cache shared by concurrent processes (docs/reproducing.md, "Running on a cluster")."""

from __future__ import annotations

import json
import multiprocessing
import shutil
from pathlib import Path

import pytest
import torch

from networks.features import MultimodalFeatures
from scripts import reproduce
from utils.data.mvtec3d import MVTec3DDataset, collate_samples
from utils.evaluation.metrics import METRIC_KEYS
from utils.runs.feature_cache import FeatureCache

ray = pytest.importorskip("ray", reason="Ray is optional: pip install -r requirements-distributed.txt")


@pytest.fixture(scope="module")
def local_ray():
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
    yield
    ray.shutdown()


def tiny(data: Path, work: Path, run_name: str, *extra: str) -> list[str]:
    return ["--dataset_path", str(data), "--preset", "tiny", "--random_init", "--epochs_no", "1", "--class_name",
            "all", "--cache_dir", str(work / "cache"), "--device", "cpu", "--checkpoint_savepath",
            str(work / f"ckpt_{run_name}"), "--results_dir", str(work / "results"), "--run_name", run_name, *extra]


def metrics(work: Path, run_name: str) -> dict:
    document = json.loads((work / "results" / run_name / "metrics.json").read_text())
    return {c: {k: m[k] for k in METRIC_KEYS} for c, m in document["classes"].items()}  # timings aside


def test_ray_engine_gives_the_local_numbers_and_reports_a_failed_task(local_ray, synthetic_root: Path,
                                                                       tmp_path: Path):
    # default options: both engines run the classes with this machine's default thread count (--threads)
    assert reproduce.main(tiny(synthetic_root, tmp_path, "local")) == 0
    assert reproduce.main(tiny(synthetic_root, tmp_path, "ray", "--engine", "ray")) == 0
    assert metrics(tmp_path, "ray") == metrics(tmp_path, "local")
    stored = json.loads((tmp_path / "results" / "ray" / "metrics.json").read_text())
    assert stored["config"]["threads"] == torch.get_num_threads()
    assert sorted(metrics(tmp_path, "ray")) == ["box", "dome"]
    assert reproduce.main(tiny(synthetic_root, tmp_path, "ray", "--engine", "ray")) == 0, "a rerun skips both"

    broken = tmp_path / "broken"  # box's training clouds unreadable: that task fails (after its retry)
    shutil.copytree(synthetic_root, broken)
    for cloud in (broken / "box" / "train" / "good" / "xyz").iterdir():
        cloud.write_bytes(b"not a tiff")
    assert reproduce.main(tiny(broken, tmp_path, "broken", "--engine", "ray")) == 1
    run = tmp_path / "results" / "broken"
    assert (run / "classes" / "dome.json").is_file() and not (run / "classes" / "box.json").exists()
    assert not (run / "metrics.json").exists(), "no summary table while a class is missing"


def _fill_cache(root: str, cache_dir: str) -> None:
    torch.set_num_threads(1)
    extractor = MultimodalFeatures("tiny", random_init=True)
    FeatureCache(extractor, cache_dir).precompute(MVTec3DDataset(root, "dome", "test", extractor.img_size))


def test_concurrent_processes_share_the_feature_cache(synthetic_root: Path, tmp_path: Path):
    """Two processes fill the same cache at once: every entry ends complete and equal to a fresh computation."""
    context = multiprocessing.get_context("spawn")
    workers = [context.Process(target=_fill_cache, args=(str(synthetic_root), str(tmp_path / "cache")))
               for _ in range(2)]
    for worker in workers:
        worker.start()
    for worker in workers:
        worker.join(timeout=300)
        assert worker.exitcode == 0
    assert not list((tmp_path / "cache").rglob("*.tmp")), "no half-written file left behind"
    extractor = MultimodalFeatures("tiny", random_init=True)
    dataset = MVTec3DDataset(synthetic_root, "dome", "test", extractor.img_size)
    cache = FeatureCache(extractor, tmp_path / "cache")
    batch = collate_samples([dataset[i] for i in range(len(dataset))])
    cached = cache.features(batch)
    assert cache.hits > 0 and cache.misses == 0
    fresh = extractor.get_features_maps(batch.rgb, batch.xyz)
    assert all(torch.equal(a, b) for a, b in zip(cached, fresh))
