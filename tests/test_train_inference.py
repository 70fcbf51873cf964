"""train.py → inference.py round trips with the tiny preset: files, contracts, determinism, resume, errors."""

from __future__ import annotations

import json
import logging
import os
import shutil
import signal
from pathlib import Path

import pytest
import torch
from PIL import Image

import inference
from networks.features import PRESETS
from networks.methods.cmdr import CMDRIAD, MODULES_OF_MODALITY, build_module
import train
from utils.evaluation.metrics import METRIC_KEYS
from utils.runs.checkpoints import module_path, resume_path, run_folder, sidecar_path

EPOCHS = 2


def common_args(data: Path, work: Path, modality: str = "rgbxyz") -> list[str]:
    return [
        "--dataset_path", str(data), "--preset", "tiny", "--random_init", "--epochs_no", str(EPOCHS),
        "--modality", modality, "--cache_dir", str(work / "cache"), "--device", "cpu",
    ]


def run_train(data: Path, work: Path, *extra: str, classes=("dome",), modality: str = "rgbxyz") -> int:
    return train.main([*common_args(data, work, modality), "--class_name", *classes,
                       "--checkpoint_savepath", str(work / "ckpt"), *extra])


def run_inference(data: Path, work: Path, *extra: str, classes=("dome",), modality: str = "rgbxyz") -> int:
    return inference.main([*common_args(data, work, modality), "--class_names", *classes,
                           "--checkpoint_folder", str(work / "ckpt"), "--results_dir", str(work / "results"),
                           "--run_name", "run", *extra])


def state_dicts(work: Path, class_name: str = "dome", modality: str = "rgbxyz") -> dict:
    return {name: torch.load(module_path(work / "ckpt", class_name, name, EPOCHS, 1), weights_only=True)
            for name in MODULES_OF_MODALITY[modality]}


@pytest.fixture(scope="module")
def trained(synthetic_root: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """One tiny training run of the dome class, shared by the tests that only read it."""
    work = tmp_path_factory.mktemp("trained")
    assert run_train(synthetic_root, work) == 0
    return work


def test_checkpoints_follow_the_contract(trained: Path):
    for name in MODULES_OF_MODALITY["rgbxyz"]:
        path = trained / "ckpt" / "dome" / f"{name}_dome_independent_{EPOCHS}ep_1bs.pth"
        assert path.is_file()
        module = build_module(name, PRESETS["tiny"])
        module.load_state_dict(torch.load(path, weights_only=True), strict=True)  # plain state dict, same names
    sidecar = json.loads(sidecar_path(trained / "ckpt", "dome", EPOCHS, 1).read_text())
    assert sidecar["modality"] == "rgbxyz" and sidecar["seed"] == 115 and sidecar["extractor"]["random_init"]
    assert set(sidecar["feature_fingerprints"]) == {"rgb", "xyz"}
    assert not resume_path(trained / "ckpt", "dome", EPOCHS, 1).exists(), "resume state removed when done"
    assert not list((trained / "ckpt").rglob("*.tmp")), "no temporary files left behind"


def test_inference_writes_results(synthetic_root: Path, trained: Path):
    assert run_inference(synthetic_root, trained, "--save_maps") == 0
    run = trained / "results" / "run"
    document = json.loads((run / "metrics.json").read_text())
    metrics = document["classes"]["dome"]
    assert set(METRIC_KEYS) <= set(metrics) and metrics["n_test"] == 8 and metrics["eval_samples_per_second"] > 0
    assert all(0.0 <= metrics[k] <= 1.0 for k in METRIC_KEYS)
    assert document["config"]["fusion"] == "full" and document["config"]["extractor"]["random_init"]
    assert (run / "metrics.md").read_text().startswith("| Metric | dome | Mean |")
    assert (run / "metrics.csv").is_file()
    assert len((run / "scores" / "dome.csv").read_text().splitlines()) == 1 + 8
    panels = sorted((run / "maps" / "dome").glob("*.png"))
    assert len(panels) == 8
    with Image.open(panels[0]) as panel:
        assert panel.width == 4 * 224 and panel.height > 224


def test_inference_is_deterministic_and_variants_differ(synthetic_root: Path, trained: Path):
    def metrics(*extra: str) -> dict:
        assert run_inference(synthetic_root, trained, *extra) == 0
        document = json.loads((trained / "results" / "run" / "metrics.json").read_text())
        return {k: document["classes"]["dome"][k] for k in METRIC_KEYS}

    first = metrics()
    assert metrics() == first
    assert metrics("--fusion", "case6") != first


def test_native_resolution_evaluation(synthetic_root: Path, trained: Path):
    assert run_inference(synthetic_root, trained, "--eval_resolution", "native") == 0
    document = json.loads((trained / "results" / "run" / "metrics.json").read_text())
    assert document["config"]["eval_resolution"] == "native"
    assert 0.0 <= document["classes"]["dome"]["AUPRO@30%"] <= 1.0


def test_training_is_deterministic(synthetic_root: Path, trained: Path, tmp_path: Path):
    assert run_train(synthetic_root, tmp_path) == 0
    again, reference = state_dicts(tmp_path), state_dicts(trained)
    for name in reference:
        for key in reference[name]:
            assert torch.equal(again[name][key], reference[name][key]), f"{name}.{key}"


@pytest.mark.parametrize("source", ["files every step", "cache files every step"])
def test_features_held_in_memory_train_the_same_weights(synthetic_root: Path, trained: Path, tmp_path: Path,
                                                        monkeypatch: pytest.MonkeyPatch, source: str):
    """The epochs read the training features held in memory (TrainingSet); reading every batch's files and
    computing its features (no cache), or reading the cache's entries every step (over the memory budget), trains
    the same weights bit for bit — and in the same order of samples."""
    from utils.runs import training_set

    if source == "files every step":
        assert run_train(synthetic_root, tmp_path, "--cache_dir", "none") == 0
    else:
        monkeypatch.setattr(training_set, "HELD_PARTS_BUDGET", 0)
        assert run_train(synthetic_root, tmp_path) == 0
    again, reference = state_dicts(tmp_path), state_dicts(trained)
    for name in reference:
        for key in reference[name]:
            assert torch.equal(again[name][key], reference[name][key]), f"{name}.{key}"


def test_the_epochs_see_the_samples_in_the_seeded_order_of_the_dataset_loader(synthetic_root: Path):
    """index_loader draws the orders make_dataloader gives the dataset (a seed keeps its order of samples)."""
    from utils.data.mvtec3d import MVTec3DDataset, make_dataloader
    from utils.runs.training_set import index_loader

    dataset = MVTec3DDataset(synthetic_root, "dome", "train", 64)
    by_records = make_dataloader(dataset, 3, shuffle=True, seed=115)
    by_indices = index_loader(len(dataset), 3, shuffle=True, seed=115)
    names = [record.name for record in dataset.records]
    for _ in range(3):  # epochs
        assert [[r.name for r in b.records] for b in by_records] == [[names[i] for i in b] for b in by_indices]


def test_activation_checkpointing_trains_the_same_weights(synthetic_root: Path, trained: Path, tmp_path: Path,
                                                           monkeypatch: pytest.MonkeyPatch):
    """Recomputing the checkpointed segments in backward (dropout masks replayed) gives the same weights, bit for
    bit, as keeping their activations."""
    import networks.blocks.activation_checkpointing as checkpointing

    calls = []
    real = checkpointing.checkpoint
    monkeypatch.setattr(checkpointing, "checkpoint", lambda *a, **k: calls.append(1) or real(*a, **k))
    assert run_train(synthetic_root, tmp_path, "--activation_checkpointing") == 0
    assert calls, "no segment was checkpointed"
    again, reference = state_dicts(tmp_path), state_dicts(trained)
    for name in reference:
        for key in reference[name]:
            assert torch.equal(again[name][key], reference[name][key]), f"{name}.{key}"


def assert_resumes_to_the_uninterrupted_weights(data: Path, trained: Path, work: Path) -> None:
    assert run_train(data, work, "--resume") == 0
    resumed, reference = state_dicts(work), state_dicts(trained)
    for name in reference:
        for key in reference[name]:
            assert torch.equal(resumed[name][key], reference[name][key]), f"{name}.{key}"


def _at_call(monkeypatch: pytest.MonkeyPatch, call: int, action) -> None:
    """CMDRIAD.losses runs ``action()`` at its ``call``-th call, before that step computes or changes anything."""
    original = CMDRIAD.losses
    calls = {"n": 0}

    def patched(self, *args, **kwargs):
        calls["n"] += 1
        if calls["n"] == call:
            action()
        return original(self, *args, **kwargs)

    monkeypatch.setattr(CMDRIAD, "losses", patched)


def _raise(error: BaseException):
    raise error


def _ctrl_c() -> None:
    os.kill(os.getpid(), signal.SIGINT)


def test_ctrl_c_mid_epoch_saves_and_resumes_exactly(synthetic_root: Path, trained: Path, tmp_path: Path,
                                                     monkeypatch: pytest.MonkeyPatch,
                                                     caplog: pytest.LogCaptureFixture):
    steps_per_epoch = 4  # n_train of the test dataset, batch size 1
    _at_call(monkeypatch, steps_per_epoch + 2, lambda: _raise(KeyboardInterrupt()))  # in the 2nd step of epoch 2
    with caplog.at_level(logging.WARNING):
        assert run_train(synthetic_root, tmp_path) == train.INTERRUPTED_EXIT
    state = torch.load(resume_path(tmp_path / "ckpt", "dome", EPOCHS, 1), weights_only=True)
    assert (state["epoch"], state["step"]) == (1, 1), "the state after the last finished step"
    assert not sidecar_path(tmp_path / "ckpt", "dome", EPOCHS, 1).exists()
    message = [r.getMessage() for r in caplog.records if "Continue with" in r.getMessage()]
    assert len(message) == 1 and "interrupted at epoch 2, step 1" in message[0]
    assert message[0].endswith("--resume") and "python train.py" in message[0]
    monkeypatch.undo()
    assert_resumes_to_the_uninterrupted_weights(synthetic_root, trained, tmp_path)


def test_a_real_ctrl_c_finishes_the_step_first(synthetic_root: Path, trained: Path, tmp_path: Path,
                                               monkeypatch: pytest.MonkeyPatch):
    """SIGINT during a step: the step completes, then the state is saved and training stops."""
    _at_call(monkeypatch, 6, _ctrl_c)  # arrives while the 2nd step of epoch 2 runs
    assert run_train(synthetic_root, tmp_path) == train.INTERRUPTED_EXIT
    state = torch.load(resume_path(tmp_path / "ckpt", "dome", EPOCHS, 1), weights_only=True)
    assert (state["epoch"], state["step"]) == (1, 2), "the interrupted step was finished"
    monkeypatch.undo()
    assert_resumes_to_the_uninterrupted_weights(synthetic_root, trained, tmp_path)


def test_a_second_ctrl_c_stops_at_once_without_saving_a_half_step(synthetic_root: Path, trained: Path,
                                                                   tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                                                   caplog: pytest.LogCaptureFixture):
    _at_call(monkeypatch, 6, lambda: (_ctrl_c(), _ctrl_c()))  # the second one interrupts this very step
    with caplog.at_level(logging.WARNING):
        assert run_train(synthetic_root, tmp_path) == train.INTERRUPTED_EXIT
    assert "stopped at once; the last saved state" in caplog.text
    state = torch.load(resume_path(tmp_path / "ckpt", "dome", EPOCHS, 1), weights_only=True)
    assert (state["epoch"], state["step"]) == (1, 0), "the snapshot of the last epoch's end, not the half step"
    monkeypatch.undo()
    assert_resumes_to_the_uninterrupted_weights(synthetic_root, trained, tmp_path)


def test_timed_snapshots_survive_a_crash(synthetic_root: Path, trained: Path, tmp_path: Path,
                                         monkeypatch: pytest.MonkeyPatch):
    """--snapshot_minutes 0 saves after every step: a process killed mid-epoch (here: an error that is not
    Ctrl-C, so nothing is saved at the end) resumes from its last step to the same weights."""
    _at_call(monkeypatch, 3, lambda: _raise(RuntimeError("killed")))
    with pytest.raises(RuntimeError, match="killed"):
        run_train(synthetic_root, tmp_path, "--snapshot_minutes", "0")
    state = torch.load(resume_path(tmp_path / "ckpt", "dome", EPOCHS, 1), weights_only=True)
    assert (state["epoch"], state["step"]) == (0, 2)
    monkeypatch.undo()
    assert_resumes_to_the_uninterrupted_weights(synthetic_root, trained, tmp_path)


def test_resume_skips_finished_classes(synthetic_root: Path, trained: Path, caplog: pytest.LogCaptureFixture):
    before = sidecar_path(trained / "ckpt", "dome", EPOCHS, 1).stat().st_mtime_ns
    with caplog.at_level(logging.INFO):
        assert run_train(synthetic_root, trained, "--resume") == 0
    assert "already trained" in caplog.text
    assert sidecar_path(trained / "ckpt", "dome", EPOCHS, 1).stat().st_mtime_ns == before


@pytest.mark.parametrize("modality", ["rgb", "xyz"])
def test_single_modality_round_trip(synthetic_root: Path, tmp_path: Path, modality: str):
    assert run_train(synthetic_root, tmp_path, modality=modality) == 0
    folder = run_folder(tmp_path / "ckpt", "cmdr", modality, 115) / "dome"
    assert folder == tmp_path / "ckpt" / f"cmdr_{modality}_seed115" / "dome"
    files = sorted(p.name.split("_dome_")[0] for p in folder.glob("*.pth"))
    # the 2D-only model's default cell_norm=auto keeps the per-pixel statistics as one more module file
    extra = ["cell_statistics"] if modality == "rgb" else []
    assert files == sorted(list(MODULES_OF_MODALITY[modality]) + extra)
    assert run_inference(synthetic_root, tmp_path, modality=modality) == 0
    document = json.loads((tmp_path / "results" / "run" / "metrics.json").read_text())
    assert document["config"]["modality"] == modality


def test_missing_checkpoint_is_a_clear_error(synthetic_root: Path, trained: Path, tmp_path: Path,
                                             caplog: pytest.LogCaptureFixture):
    with caplog.at_level(logging.ERROR):
        assert run_inference(synthetic_root, tmp_path) == 1
    assert "no trained run for dome" in caplog.text and "python train.py" in caplog.text
    (tmp_path / "ckpt" / "dome").mkdir(parents=True)
    for path in (trained / "ckpt" / "dome").iterdir():  # a run whose Dec3D file is missing
        if not path.name.startswith("Dec3D"):
            (tmp_path / "ckpt" / "dome" / path.name).write_bytes(path.read_bytes())
    caplog.clear()
    with caplog.at_level(logging.ERROR):
        assert run_inference(synthetic_root, tmp_path) == 1
    assert "not found" in caplog.text and "Dec3D_dome_independent_2ep_1bs.pth" in caplog.text


def test_checkpoint_of_another_configuration_is_refused(synthetic_root: Path, trained: Path,
                                                        caplog: pytest.LogCaptureFixture):
    with caplog.at_level(logging.ERROR):
        assert run_inference(synthetic_root, trained, "--bn_mode", "running") == 1
    assert "--bn_mode running contradicts the trained run's bn_mode 'sample'" in caplog.text
    caplog.clear()
    with caplog.at_level(logging.ERROR):
        assert run_inference(synthetic_root, trained, "--preset", "lite") == 1
    assert "--preset lite contradicts the trained run's preset 'tiny'" in caplog.text


def test_inference_takes_the_extractor_settings_of_the_run(synthetic_root: Path, trained: Path):
    """No --preset, --random_init or --epochs_no: everything comes from the run's sidecar."""
    assert inference.main(["--dataset_path", str(synthetic_root), "--class_names", "dome", "--device", "cpu",
                           "--checkpoint_folder", str(trained / "ckpt"), "--cache_dir", str(trained / "cache"),
                           "--results_dir", str(trained / "results"), "--run_name", "recorded"]) == 0
    config = json.loads((trained / "results" / "recorded" / "metrics.json").read_text())["config"]
    assert config["preset"] == "tiny" and config["extractor"]["random_init"]


def test_checkpoints_without_sidecar_load_with_a_warning(synthetic_root: Path, trained: Path, tmp_path: Path,
                                                         caplog: pytest.LogCaptureFixture):
    """The authors' released checkpoints have no sidecar: they load, with a warning."""
    (tmp_path / "ckpt" / "dome").mkdir(parents=True)
    for path in (trained / "ckpt" / "dome").glob("*.pth"):
        (tmp_path / "ckpt" / "dome" / path.name).write_bytes(path.read_bytes())
    with caplog.at_level(logging.WARNING):
        assert run_inference(synthetic_root, tmp_path) == 0
    assert "cannot verify" in caplog.text


def test_damaged_checkpoint_is_a_clear_error(synthetic_root: Path, trained: Path, tmp_path: Path,
                                             caplog: pytest.LogCaptureFixture):
    (tmp_path / "ckpt" / "dome").mkdir(parents=True)
    for path in (trained / "ckpt" / "dome").iterdir():
        (tmp_path / "ckpt" / "dome" / path.name).write_bytes(path.read_bytes())
    target = module_path(tmp_path / "ckpt", "dome", "Dec3D", EPOCHS, 1)
    target.write_bytes(target.read_bytes()[:100])
    with caplog.at_level(logging.ERROR):
        assert run_inference(synthetic_root, tmp_path) == 1
    assert "unreadable checkpoint" in caplog.text


def test_unknown_class(synthetic_root: Path, tmp_path: Path, caplog: pytest.LogCaptureFixture):
    with caplog.at_level(logging.ERROR):
        assert run_train(synthetic_root, tmp_path, classes=("bagel",)) == 1
    assert "bagel not found" in caplog.text


# --- run identity: folders per method and seed, no run overwrites another ------------------------------------

def test_methods_and_seeds_get_their_own_folders(synthetic_root: Path, trained: Path, tmp_path: Path):
    shutil.copytree(trained / "ckpt", tmp_path / "ckpt")  # beside a finished cmdr run
    ckpt = tmp_path / "ckpt"
    before = sidecar_path(ckpt, "dome", EPOCHS, 1).read_bytes()
    assert run_train(synthetic_root, tmp_path, "--model", "cfm") == 0
    assert run_train(synthetic_root, tmp_path, "--seed", "7") == 0
    cfm = run_folder(ckpt, "cfm", "rgbxyz", 115) / "dome"
    assert sorted(p.name.split("_")[0] for p in cfm.glob("*.pth")) == ["map2Dto3D", "map3Dto2D"]
    sidecar = json.loads(sidecar_path(cfm.parent, "dome", EPOCHS, 1).read_text())
    assert sidecar["model"] == "cfm" and sidecar["optimizers"] == {
        "cfm": {"name": "Adam", "lr": 1e-3, "betas": [0.9, 0.999], "weight_decay": 0.0}}
    assert len(sidecar["dataset_fingerprint"]) == 16
    seed7 = json.loads(sidecar_path(ckpt / "cmdr_rgbxyz_seed7", "dome", EPOCHS, 1).read_text())
    assert seed7["seed"] == 7
    assert sidecar_path(ckpt, "dome", EPOCHS, 1).read_bytes() == before, "cmdr seed 115 untouched"
    assert run_inference(synthetic_root, tmp_path, "--model", "cfm") == 0
    document = json.loads((tmp_path / "results" / "run" / "metrics.json").read_text())
    assert document["config"]["model"] == "cfm"


def test_training_never_overwrites_another_run(synthetic_root: Path, trained: Path, caplog: pytest.LogCaptureFixture):
    files = {p: p.read_bytes() for p in (trained / "ckpt" / "dome").iterdir()}
    for extra, field in ((("--bn_mode", "running"), "bn_mode"), (("--resume", "--bn_mode", "running"), "bn_mode")):
        caplog.clear()
        with caplog.at_level(logging.ERROR):
            assert run_train(synthetic_root, trained, *extra) == 1
        assert "belongs to another configuration" in caplog.text and field in caplog.text
    assert {p: p.read_bytes() for p in (trained / "ckpt" / "dome").iterdir()} == files


def test_changed_training_data_is_another_run(synthetic_root: Path, trained: Path, tmp_path: Path,
                                              caplog: pytest.LogCaptureFixture):
    data = tmp_path / "data"
    (data / "dome").mkdir(parents=True)
    for path in synthetic_root.iterdir():  # the same dataset with one training sample less
        if path.is_file():
            (data / path.name).write_bytes(path.read_bytes())
    for split in ("train", "test"):
        (data / "dome" / split).symlink_to(synthetic_root / "dome" / split, target_is_directory=True)
    shutil.copytree(trained / "ckpt", tmp_path / "ckpt")  # the shared run stays as it is for the other tests
    assert run_train(data, tmp_path, "--resume") == 0, "the same data under another path: the same run"
    train_good = data / "dome" / "train"
    train_good.unlink()
    (train_good / "good").mkdir(parents=True)
    for kind in ("rgb", "xyz"):
        files = sorted((synthetic_root / "dome" / "train" / "good" / kind).iterdir())[1:]
        (train_good / "good" / kind).mkdir()
        for path in files:
            (train_good / "good" / kind / path.name).symlink_to(path)
    with caplog.at_level(logging.ERROR):
        assert run_train(data, tmp_path, "--resume") == 1
    assert "dataset_fingerprint" in caplog.text


def test_authors_files_without_sidecar_are_not_overwritten(synthetic_root: Path, trained: Path, tmp_path: Path,
                                                           caplog: pytest.LogCaptureFixture):
    (tmp_path / "ckpt" / "dome").mkdir(parents=True)
    for path in (trained / "ckpt" / "dome").glob("*.pth"):
        (tmp_path / "ckpt" / "dome" / path.name).write_bytes(b"the authors' weights")
    with caplog.at_level(logging.ERROR):
        assert run_train(synthetic_root, tmp_path) == 1
    assert "without a sidecar" in caplog.text
    assert {p.read_bytes() for p in (tmp_path / "ckpt" / "dome").iterdir()} == {b"the authors' weights"}


def test_inference_finds_the_run_or_lists_the_choices(synthetic_root: Path, trained: Path, tmp_path: Path,
                                                      caplog: pytest.LogCaptureFixture):
    shutil.copytree(trained / "ckpt", tmp_path / "ckpt")  # the shared run stays as it is for the other tests
    found = inference.main(["--dataset_path", str(synthetic_root), "--class_names", "dome", "--preset", "tiny",
                            "--random_init", "--device", "cpu", "--checkpoint_folder", str(tmp_path / "ckpt"),
                            "--results_dir", str(tmp_path / "results"), "--cache_dir", str(tmp_path / "cache"),
                            "--eval_batch_size", "3"])
    assert found == 0, "no --epochs_no/--batch_size: the folder's only run"
    assert run_train(synthetic_root, tmp_path, "--batch_size", "2") == 0
    with caplog.at_level(logging.ERROR):
        assert run_inference(synthetic_root, tmp_path) == 1
    assert "--epochs_no 2 --batch_size 1, --epochs_no 2 --batch_size 2" in caplog.text
    assert run_inference(synthetic_root, tmp_path, "--batch_size", "2") == 0


@pytest.mark.parametrize(("entry", "flag"), [("train", "--epochs_no"), ("train", "--batch_size"),
                                             ("inference", "--eval_batch_size"), ("inference", "--epochs_no")])
def test_counts_below_one_are_refused(synthetic_root: Path, tmp_path: Path, entry: str, flag: str,
                                      capsys: pytest.CaptureFixture):
    run = run_train if entry == "train" else run_inference
    with pytest.raises(SystemExit):
        run(synthetic_root, tmp_path, flag, "0")
    assert f"{flag} must be at least 1" in capsys.readouterr().err


def test_a_method_without_the_modality_is_refused(synthetic_root: Path, tmp_path: Path, capsys: pytest.CaptureFixture):
    with pytest.raises(SystemExit):
        run_train(synthetic_root, tmp_path, "--model", "cfm", modality="rgb")
    assert "--model cfm supports --modality rgbxyz" in capsys.readouterr().err


def test_a_bug_keeps_its_traceback(synthetic_root: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    """Our own error types (the user's data, files, settings) are one log line; anything else is a bug."""
    def broken(*args, **kwargs):
        raise RuntimeError("a genuine bug")

    monkeypatch.setattr(CMDRIAD, "losses", broken)
    with pytest.raises(RuntimeError, match="a genuine bug"):
        run_train(synthetic_root, tmp_path)


def test_inference_batch_size_does_not_change_per_sample_results(synthetic_root: Path, trained: Path):
    def scores(batch_size: int) -> tuple[list[float], dict]:
        assert run_inference(synthetic_root, trained, "--eval_batch_size", str(batch_size)) == 0
        run = trained / "results" / "run"
        lines = (run / "scores" / "dome.csv").read_text().splitlines()[1:]
        document = json.loads((run / "metrics.json").read_text())
        return [float(line.split(",")[2]) for line in lines], {k: document["classes"]["dome"][k] for k in METRIC_KEYS}

    (one, metrics_one), (three, metrics_three) = scores(1), scores(3)
    assert one == pytest.approx(three, rel=1e-5)  # batched matrix products only reassociate float sums
    # the metrics integrate over thresholds of the maps: float32 reassociation moves them by ~1e-6 (AUPRO@30%
    # moved by 1.07e-6 once); a wrong sample order or mask would move them by orders of magnitude more
    assert metrics_one == pytest.approx(metrics_three, abs=1e-5)


def test_memory_bank_fit_round_trip_and_ctrl_c(synthetic_root: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    """A memory-bank method is fitted by train.py (its run named 1ep whatever --epochs_no says) and evaluated by
    inference.py; Ctrl-C during a fit writes nothing and exits 130."""
    from networks.methods.btf import BTF

    original = BTF.fit
    monkeypatch.setattr(BTF, "fit", lambda self, batches: _raise(KeyboardInterrupt()))
    assert run_train(synthetic_root, tmp_path, "--model", "btf") == train.INTERRUPTED_EXIT
    folder = run_folder(tmp_path / "ckpt", "btf", "rgbxyz", 115) / "dome"
    assert not folder.is_dir() or not any(folder.iterdir()), "an interrupted fit writes nothing"
    monkeypatch.setattr(BTF, "fit", original)
    assert run_train(synthetic_root, tmp_path, "--model", "btf") == 0
    sidecar = json.loads(sidecar_path(folder.parent, "dome", 1, 1).read_text())
    assert sidecar["fit"]["bank_size"] >= 1 and sidecar["epochs_no"] == 1 and "final_losses" not in sidecar
    assert run_inference(synthetic_root, tmp_path, "--model", "btf") == 0
    metrics = json.loads((tmp_path / "results" / "run" / "metrics.json").read_text())
    assert 0 <= metrics["classes"]["dome"]["I-AUROC"] <= 1


def test_snapshot_epochs_space_out_the_saved_states(synthetic_root: Path, trained: Path, tmp_path: Path,
                                                    monkeypatch: pytest.MonkeyPatch):
    """--snapshot_epochs 2 writes no state after epoch 1 of 2 (and none after the last epoch ever): a crash in epoch
    2 then restarts from scratch, still to the uninterrupted weights; with the default the state after epoch 1 is
    there."""
    steps_per_epoch = len(list((synthetic_root / "dome" / "train" / "good" / "rgb").iterdir()))
    for every, expected in ((2, None), (1, (1, 0))):
        work = tmp_path / f"every{every}"
        _at_call(monkeypatch, steps_per_epoch + 2, lambda: _raise(RuntimeError("killed")))
        with pytest.raises(RuntimeError, match="killed"):
            run_train(synthetic_root, work, "--snapshot_epochs", str(every))
        path = resume_path(work / "ckpt", "dome", EPOCHS, 1)
        state = torch.load(path, weights_only=True) if path.is_file() else None
        assert (None if state is None else (state["epoch"], state["step"])) == expected
        monkeypatch.undo()
        assert_resumes_to_the_uninterrupted_weights(synthetic_root, trained, work)


def test_a_non_finite_loss_skips_only_its_own_module():
    """optimisation_step reads all losses in one host transfer; a module whose loss is NaN keeps its weights (and
    has no Adam state), the others step, and the NaN loss is reported as None."""
    config = PRESETS["tiny"]
    model = CMDRIAD(config)
    grid = config.grid_size**2
    f2d, f3d = torch.randn(2, grid, config.rgb_dim), torch.randn(2, grid, config.xyz_dim)
    real_losses = model.losses

    def one_nan(*args):
        losses = real_losses(*args)
        return {**losses, "Dec2D": losses["Dec2D"] * float("nan")}

    model.losses = one_nan
    optimizers = train.make_optimizers(model)
    before = {name: {k: v.clone() for k, v in module.named_parameters()} for name, module in model.trainable().items()}
    losses = train.optimisation_step(model, optimizers, f2d, f3d, torch.ones(2, grid, dtype=torch.bool))
    assert losses["Dec2D"] is None
    assert all(isinstance(losses[name], float) for name in losses if name != "Dec2D")
    for name, module in model.trainable().items():
        unchanged = all(torch.equal(before[name][k], v) for k, v in module.named_parameters())
        assert unchanged == (name == "Dec2D"), name
    assert not optimizers["Dec2D"].state


def test_amp_on_a_cpu_that_emulates_bf16_warns(monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture):
    from utils.runs import pipeline

    probed = []
    monkeypatch.setattr(pipeline, "bf16_slowdown", lambda device: probed.append(device) or 30.0)
    with caplog.at_level(logging.WARNING):
        pipeline.warn_if_bf16_is_emulated(torch.device("cpu"), amp=False)
        assert not probed and "--amp" not in caplog.text, "no probe without --amp"
        pipeline.warn_if_bf16_is_emulated(torch.device("cpu"), amp=True)
    assert "30× slower" in caplog.text
    assert pipeline.BF16_EMULATED_SLOWDOWN < 30.0


def test_bf16_slowdown_is_a_ratio_of_real_timings():
    from utils.runs.pipeline import bf16_slowdown

    assert bf16_slowdown(torch.device("cpu"), size=64) > 0
    assert bf16_slowdown(torch.device("meta")) == 1.0
