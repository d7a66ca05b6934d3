"""Segmentation quality of voxelflow's whole lifecycle against a plain MONAI tutorial script, same wall-clock time.

Data: ``--cases`` (default 16) T1 brain MRIs of 197×233×189 voxels at 1 mm made from real anatomy,
the MNI152 2009 template and its grey- and white-matter probability maps that nilearn ships inside
its package (nothing is downloaded). Each case is the template under its own smooth random
deformation (a small rotation, scaling and shift plus an elastic displacement field), with its own
contrast (gamma), gain, bias field and noise; labels 0 background, 1 grey matter, 2 white matter come
from the deformed probability maps. Written as a Decathlon folder (NIfTI, ``dataset.json``); seeded,
so a rerun builds the same files (and the same case hashes, hence the same split).

* voxelflow: the lifecycle's stages in-process, without Prefect, on a fresh home folder (store,
  SQLite database, MLflow): ingest → preprocess (Dask) → split → MLflow run → train (patches,
  sliding-window validation every ``val_every`` epochs, best checkpoint kept) → evaluate (the best
  weights as the registered model, on the validation cases in their original 1 mm grid), with the
  spec ``benchmarks/specs/quality.yaml`` and ``train.epochs`` = ``--epochs``. Its wall time T runs from
  the start of ingestion to the end of evaluation (imports excluded); the model is registered after.
* plain MONAI: a script like MONAI's spleen_segmentation_3d tutorial — LoadImaged, EnsureChannelFirstd,
  Orientationd, Spacingd, CropForegroundd, NormalizeIntensityd, RandCropByPosNegLabeld, ``CacheDataset``,
  ``DataLoader``, the same UNet, DiceCELoss, Adam, learning rate, batch, patches and seed, sliding-window
  validation with ``DiceMetric`` every ``val_every`` epochs keeping the best weights — on the same
  train/validation split (voxelflow's, mapped from case ids to files through its ledger). It gets the
  same budget T, its data loading and caching included: it trains epoch after epoch and stops taking
  steps when one more step and a last validation would pass T.

Each side runs in a fresh process of its own with the same number of torch threads, fp32 on the CPU,
after waiting (up to ``--idle-wait`` s) for the machine to be idle; the CPU time other processes took
while it ran is printed with it, since a wall-clock budget is only fair if both sides had the machine
alike.

Both final models are scored on the validation cases in their original 1 mm grid against the
original labels. voxelflow: its evaluation stage's score of the registered model (its ``Segmenter``:
preprocess, sliding window, argmax, mapped back to the input grid); the benchmark scores the
registered model again from the NIfTI files and warns if the two differ. MONAI: the best weights as
the tutorial's "evaluation on original image spacings" does (``Invertd`` of the logits, interpolated,
then argmax). Dice: MONAI ``compute_dice``, foreground classes 1..2, mean over classes then over cases.

* ``train_quality_vs_monai`` = voxelflow's validation Dice ÷ the MONAI script's. Goal ≥ 1.0.

With ``--budget SECONDS`` both sides get that wall time instead of a T that voxelflow's epochs set.
voxelflow runs its stages with ``train.epochs`` = 10000 and ``train.max_seconds`` = the budget minus
the time its stages took before training, minus an estimate of its evaluation stage, minus a margin
for the train stage's work outside its loop (loading the cases, MLflow, the curve: 2 % of the budget
+ 3 s). The evaluation is estimated by a first short measurement, taken just before training and
counted in T: the evaluation's own per-case work (``score_cases`` with its ``Segmenter``, preprocess,
sliding window, inversion, metrics) on one validation case with the untrained network, times the
validation cases, plus 10 % for the overlay and MLflow logging the stage ends with (an untrained
network's prediction costs what a trained one's does; one window is inferred first, untimed, since
the evaluation runs in a process that training has warmed). Its T is then checked against the budget
(both printed, with the evaluation's estimate beside its time). The MONAI script gets the budget as
it gets T without ``--budget``. The metric line is then ``train_quality_vs_monai_long`` for a budget
of 450 s or more, ``train_quality_vs_monai`` below. Goal ≥ 1.0 for both.

Informative lines: each side's epochs, steps, steps/s, seconds and best in-training validation; both
networks scored alike in the 2 mm preprocessed space (training alone compared) and voxelflow's weights
through the tutorial's inversion (inference alone compared); peak RSS of each side's process, and
with its child processes (Dask workers) summed.

    python benchmarks/train_quality.py [--cases 16] [--epochs 24] [--threads N] [--workdir DIR] [--keep]
    python benchmarks/train_quality.py --quick      # 12 cases, 2 epochs: a smoke run of a few minutes
    python benchmarks/train_quality.py --budget 450 # both sides 450 s: train_quality_vs_monai_long
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
import warnings
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT), str(ROOT / "src")]
from preprocess import ForeignCpu, wait_until_idle  # noqa: E402 - benchmarks/preprocess.py, next to this script

SPEC = ROOT / "benchmarks" / "specs" / "quality.yaml"
GENERATOR = "mni152-deformed-v1"  # bump when the data generator changes: kept folders are then rebuilt
BUDGET_EPOCHS = 10000  # train.epochs with --budget: train.max_seconds ends the training
LONG_BUDGET_S = 450.0  # from this budget on, the metric line is train_quality_vs_monai_long


def emit(obj: dict) -> None:
    print(json.dumps(obj), flush=True)


class TreeRSS:
    """Peak RSS of this process plus all its descendants (Dask workers), sampled every 0.2 s in a thread."""

    def __init__(self) -> None:
        import threading

        self.peak, self._stop = 0, threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _run(self) -> None:
        import psutil

        me = psutil.Process()
        while not self._stop.wait(0.2):
            total = 0
            for proc in [me, *me.children(recursive=True)]:
                try:
                    total += proc.memory_info().rss
                except psutil.Error:  # a child that just ended
                    pass
            self.peak = max(self.peak, total)

    def result(self) -> dict[str, int]:
        self._stop.set()
        self._thread.join()
        with open("/proc/self/status") as fh:
            hwm = next(int(line.split()[1]) for line in fh if line.startswith("VmHWM")) / 1024
        return {"process_mib": round(hwm), "with_children_mib": round(self.peak / 2**20)}


# ---------------------------------------------------------------------------------------------- data


def _smooth_field(rng: np.random.Generator, grid: tuple[int, ...], shape: tuple[int, ...], sigma: float):
    """A smooth random field over ``shape``: normal values on a coarse grid, cubic-spline upsampled to a
    quarter of the resolution, then trilinearly to the whole (a full-size spline would take seconds)."""
    import torch
    from scipy import ndimage

    coarse = rng.normal(0.0, sigma, grid)
    quarter = ndimage.zoom(coarse, [max(2, s // 4) / g for s, g in zip(shape, grid)], order=3, mode="nearest")
    full = torch.nn.functional.interpolate(torch.as_tensor(quarter, dtype=torch.float32)[None, None], size=shape,
                                           mode="trilinear", align_corners=True)
    return full[0, 0].numpy()


def make_case(t1: np.ndarray, gm: np.ndarray, wm: np.ndarray, rng: np.random.Generator):
    """One deformed, re-contrasted copy of the template: int16 image, uint8 label (0/1/2)."""
    from scipy import ndimage

    shape = t1.shape
    angles = np.deg2rad(rng.uniform(-8, 8, 3))
    rot = np.eye(3)
    for axis, a in enumerate(angles):
        i, j = [k for k in range(3) if k != axis]
        r = np.eye(3)
        r[i, i] = r[j, j] = np.cos(a)
        r[i, j], r[j, i] = -np.sin(a), np.sin(a)
        rot = rot @ r
    matrix = rot @ np.diag(rng.uniform(0.9, 1.1, 3))
    centre = (np.asarray(shape) - 1) / 2
    shift = rng.uniform(-5, 5, 3)
    grids = np.ogrid[tuple(slice(0, s) for s in shape)]
    coords = np.empty((3, *shape), dtype=np.float32)
    for k in range(3):  # output voxel x reads the template at matrix (x - c) + c + shift + elastic(x)
        coords[k] = centre[k] + shift[k] + sum(matrix[k, j] * (grids[j] - centre[j]) for j in range(3))
        coords[k] += _smooth_field(rng, (6, 7, 6), shape, 3.0)
    t1w, gmw, wmw = (ndimage.map_coordinates(v, coords, order=1, mode="constant", cval=0.0) for v in (t1, gm, wm))
    label = np.zeros(shape, dtype=np.uint8)
    tissue = (gmw + wmw) >= 0.5
    label[tissue] = 1 + (wmw > gmw)[tissue]
    brain = t1w > 0
    gain = rng.uniform(600, 1400)
    bias = np.exp(_smooth_field(rng, (3, 3, 3), shape, 0.15))
    image = gain * np.clip(t1w, 0, None) ** rng.uniform(0.8, 1.25) * bias
    image += rng.normal(0.0, gain * rng.uniform(0.01, 0.04), shape).astype(np.float32)
    image = np.where(brain, np.clip(image, 1, None), 0)  # skull-stripped: the background stays 0
    return np.rint(image).astype(np.int16), label


def make_dataset(dest: Path, cases: int, seed: int) -> list[dict[str, str]]:
    """A Decathlon folder of ``cases`` deformed templates; files already there from the same generator are kept."""
    import nibabel as nib
    from nilearn import datasets

    dest.mkdir(parents=True, exist_ok=True)
    stamp = dest / "generator.json"
    wanted = {"generator": GENERATOR, "seed": seed}
    if stamp.exists() and json.loads(stamp.read_text()) != wanted:
        shutil.rmtree(dest)
        dest.mkdir(parents=True)
    stamp.write_text(json.dumps(wanted))
    (dest / "imagesTr").mkdir(exist_ok=True)
    (dest / "labelsTr").mkdir(exist_ok=True)
    template = None
    files, training = [], []
    for i in range(cases):
        name = f"brain_{i:03d}.nii.gz"
        image_path, label_path = dest / "imagesTr" / name, dest / "labelsTr" / name
        if not (image_path.exists() and label_path.exists()):
            if template is None:  # package files (nilearn/datasets/data/mni_icbm152_*.nii.gz), no download
                t1_img = datasets.load_mni152_template(resolution=1)
                template = (np.asarray(t1_img.get_fdata(), np.float32),
                            np.asarray(datasets.load_mni152_gm_template(resolution=1).get_fdata(), np.float32),
                            np.asarray(datasets.load_mni152_wm_template(resolution=1).get_fdata(), np.float32),
                            np.asarray(t1_img.affine))
            image, label = make_case(*template[:3], np.random.default_rng([seed, i]))
            for arr, path in ((image, image_path), (label, label_path)):
                img = nib.Nifti1Image(arr, template[3])
                img.header.set_xyzt_units("mm")
                partial = path.with_name("partial-" + path.name)  # an interrupted run leaves no torn case
                nib.save(img, partial)
                partial.rename(path)
        files.append({"image": str(image_path), "label": str(label_path)})
        training.append({"image": f"./imagesTr/{name}", "label": f"./labelsTr/{name}"})
    (dest / "dataset.json").write_text(json.dumps({
        "name": "mni152-deformed", "description": "MNI152 2009 template (nilearn) under random smooth deformations",
        "modality": {"0": "T1"}, "labels": {"0": "background", "1": "grey matter", "2": "white matter"},
        "numTraining": cases, "training": training}, indent=1))
    return files


# ------------------------------------------------------------------------------------------ voxelflow


def voxelflow_side(cfg: dict) -> dict:
    """The lifecycle's stages in this process on a fresh home; T from ingestion to the end of evaluation."""
    import torch

    torch.set_num_threads(cfg["threads"])
    from voxelflow import pipeline
    from voxelflow.data import ingest
    from voxelflow.spec.config import Settings, load_spec

    home = Path(cfg["home"])
    shutil.rmtree(home, ignore_errors=True)
    settings = Settings(home=home, store=None, database_url=None, mlflow_tracking_uri=None,
                        mlflow_artifact_root=None, dask_scheduler=None)
    spec = load_spec(SPEC, sets=[f"data.source={cfg['data']}", f"train.epochs={cfg['epochs']}"])
    ctx = pipeline.Context(settings, spec.name)
    marks = {}
    start = time.perf_counter()
    ingested = pipeline.ingest_stage(spec.data, ctx)
    marks["ingest"] = time.perf_counter()
    prep = pipeline.preprocess_stage(spec.preprocess, ctx, ingested.case_ids)
    marks["preprocess"] = time.perf_counter()
    split = pipeline.split_stage(spec.evaluate, pipeline.usable_cases(ingested, prep))
    run_id = pipeline.start_run(spec, ctx, ingested.dataset_digest, split)
    marks["start_run"] = time.perf_counter()
    budgeted = {}
    if cfg.get("budget"):
        budgeted["evaluate_estimate_s"] = estimate_evaluation(spec, ctx, split.val)
        marks["estimate_evaluation"] = time.perf_counter()
        margin = 0.02 * cfg["budget"] + 3.0
        seconds = cfg["budget"] - (marks["estimate_evaluation"] - start) - budgeted["evaluate_estimate_s"] - margin
        if seconds <= 0:
            raise SystemExit(f"--budget {cfg['budget']}: the stages before training took "
                             f"{marks['estimate_evaluation'] - start:.0f} s and the evaluation is estimated at "
                             f"{budgeted['evaluate_estimate_s']:.0f} s: no time is left to train")
        spec = spec.model_copy(update={"train": spec.train.model_copy(update={"max_seconds": seconds})})
        budgeted["train_max_seconds"] = seconds
    outcome = pipeline.train_stage(spec, ctx, split.train, run_id, split.val)
    marks["train"] = time.perf_counter()
    evaluation = pipeline.evaluate_stage(spec.evaluate, spec.promote.model_name, ctx, outcome, split.val, run_id)
    marks["evaluate"] = time.perf_counter()
    seconds = marks["evaluate"] - start
    promotion = pipeline.register_stage(spec.promote, ctx, run_id, outcome, evaluation,
                                        pipeline.lineage(spec, ingested.dataset_digest))
    sources = {row["case_id"]: row["object"] for row in ingest.read_ledger(ctx.db, spec.name, "ingested")
               if "/imagesTr/" in row["object"]}
    stages, before = {}, start
    for name, at in marks.items():
        stages[name] = round(at - before, 1)
        before = at
    return {
        "seconds": seconds, "stages_s": stages, "train_seconds": outcome.seconds, "steps": outcome.steps,
        "epochs": len(outcome.history), "best_epoch": outcome.best_epoch, "best_val_dice_2mm": outcome.best_metric,
        "evaluation": evaluation.candidate, "train_images": [sources[c] for c in split.train],
        "val_images": [sources[c] for c in split.val], "val_ids": split.val,
        "tracking_uri": settings.tracking_uri, "model": spec.promote.model_name, "version": promotion.version,
        "promoted": promotion.promoted, "stopped_for_time": outcome.stopped_for_time, **budgeted,
    }


def estimate_evaluation(spec, ctx, val_ids: list[str]) -> float:
    """Seconds the evaluation stage will take, from its per-case work on the first validation case with
    the untrained network (preprocess, sliding window, inversion, metrics), times the cases, plus 10 % (the
    overlay and MLflow logging the stage ends with)."""
    import torch

    from voxelflow import pipeline
    from voxelflow.learn import evaluate
    from voxelflow.learn.model import Segmenter
    from voxelflow.learn.train import build_network, state_dict_bytes

    torch.manual_seed(spec.train.seed)
    segmenter = Segmenter(pipeline.model_config(spec), state_dict_bytes(build_network(spec.train.network)))
    with torch.no_grad():  # the first inference's warm-up, which the evaluation after training does not pay
        segmenter.net(torch.zeros((1, 1, *spec.roi_size()), device=segmenter.device))
    began = time.perf_counter()
    evaluate.score_cases(segmenter.segment, ctx.layout.raw, val_ids[:1], spec.evaluate.metrics,
                         pipeline.n_classes(spec.train.network))
    return 1.1 * (time.perf_counter() - began) * len(val_ids)


# -------------------------------------------------------------------------------------- plain MONAI


def tutorial_transforms(cfg: dict, keys=("image", "label")):
    """The tutorial's deterministic transforms, with the spec's values."""
    from monai.transforms import (
        CropForegroundd,
        EnsureChannelFirstd,
        LoadImaged,
        NormalizeIntensityd,
        Orientationd,
        Spacingd,
    )

    keys = list(keys)
    return [
        LoadImaged(keys=keys),
        EnsureChannelFirstd(keys=keys),
        Orientationd(keys=keys, axcodes="RAS"),
        Spacingd(keys=keys, pixdim=cfg["pixdim"], mode=("bilinear", "nearest")[:len(keys)]),
        CropForegroundd(keys=keys, source_key="image", allow_smaller=True),
        NormalizeIntensityd(keys="image", nonzero=True),
    ]


def build_unet(cfg: dict):
    from monai.networks.nets import UNet

    return UNet(**cfg["network"])


def monai_side(cfg: dict) -> dict:
    """A MONAI tutorial-style training script, given ``cfg['budget']`` seconds of wall time in all."""
    import torch

    torch.set_num_threads(cfg["threads"])
    from monai.data import CacheDataset, DataLoader, decollate_batch
    from monai.inferers import sliding_window_inference
    from monai.losses import DiceCELoss
    from monai.metrics import DiceMetric
    from monai.transforms import AsDiscrete, Compose, RandCropByPosNegLabeld
    from monai.utils import set_determinism

    start = time.perf_counter()
    deadline = start + cfg["budget"]
    set_determinism(seed=cfg["seed"])
    train_files = [{"image": f, "label": f.replace("/imagesTr/", "/labelsTr/")} for f in cfg["train_images"]]
    val_files = [{"image": f, "label": f.replace("/imagesTr/", "/labelsTr/")} for f in cfg["val_images"]]
    patch = cfg["patch"]
    train_transforms = Compose([*tutorial_transforms(cfg), RandCropByPosNegLabeld(
        keys=["image", "label"], label_key="label", spatial_size=patch, pos=1, neg=1,
        num_samples=cfg["num_samples"], image_key="image", image_threshold=0)])
    val_transforms = Compose(tutorial_transforms(cfg))
    workers = cfg["threads"]
    train_ds = CacheDataset(data=train_files, transform=train_transforms, cache_rate=1.0, num_workers=workers,
                            progress=False)
    train_loader = DataLoader(train_ds, batch_size=cfg["batch_size"], shuffle=True, num_workers=cfg["loader_workers"])
    val_ds = CacheDataset(data=val_files, transform=val_transforms, cache_rate=1.0, num_workers=workers,
                          progress=False)
    val_loader = DataLoader(val_ds, batch_size=1, num_workers=0)
    loaded = time.perf_counter()

    torch.manual_seed(cfg["seed"])
    model = build_unet(cfg)
    loss_function = DiceCELoss(to_onehot_y=True, softmax=True)
    optimizer = torch.optim.Adam(model.parameters(), cfg["learning_rate"])
    dice_metric = DiceMetric(include_background=False, reduction="mean")
    classes = cfg["network"]["out_channels"]
    post_pred, post_label = AsDiscrete(argmax=True, to_onehot=classes), AsDiscrete(to_onehot=classes)
    best, best_epoch, epoch, steps, validations = -1.0, None, 0, 0, 0
    step_times, val_seconds = [], 0.0

    def validate() -> float:
        model.eval()
        with torch.no_grad():
            for val_data in val_loader:
                outputs = sliding_window_inference(val_data["image"], cfg["roi"], cfg["sw_batch_size"], model,
                                                   overlap=cfg["overlap"])
                outputs = [post_pred(i) for i in decollate_batch(outputs)]
                labels = [post_label(i) for i in decollate_batch(val_data["label"])]
                dice_metric(y_pred=outputs, y=labels)
            metric = dice_metric.aggregate().item()
            dice_metric.reset()
        model.train()
        return metric

    stop, since_validation = False, 0
    while not stop:
        model.train()
        tick = time.perf_counter()
        for batch_data in train_loader:
            inputs, labels = batch_data["image"], batch_data["label"]
            optimizer.zero_grad()
            loss = loss_function(model(inputs), labels)
            loss.backward()
            optimizer.step()
            steps += 1
            since_validation += 1
            now = time.perf_counter()
            step_times.append(now - tick)
            tick = now
            step = float(np.mean(step_times[-4:]))  # data loading included
            # a validation not yet timed is taken as half a step per case (measured here: about that or less)
            last_validation = val_seconds or 0.5 * step * len(val_ds)
            if now + step + last_validation > deadline:  # one more step and a last validation would pass the budget
                stop = True
                break
        else:
            epoch += 1
        if since_validation and (stop or epoch % cfg["val_every"] == 0):
            began = time.perf_counter()
            metric = validate()
            val_seconds = max(val_seconds, time.perf_counter() - began)
            validations += 1
            since_validation = 0
            if metric > best:
                best, best_epoch = metric, epoch
                torch.save(model.state_dict(), cfg["weights"])
    seconds = time.perf_counter() - start
    return {"seconds": seconds, "load_seconds": loaded - start, "steps": steps, "epochs": epoch,
            "partial_epoch_steps": steps - epoch * len(train_loader), "validations": validations,
            "best_epoch": best_epoch, "best_val_dice_2mm_tutorial_metric": best}


def tutorial_original_spacing(cfg: dict, net, image_path: str) -> np.ndarray:
    """The tutorial's evaluation on original spacings: sliding window in the preprocessed space, the
    logits mapped back to the original grid (``Invertd``, interpolated), then argmax."""
    import torch
    from monai.data import decollate_batch, list_data_collate
    from monai.inferers import sliding_window_inference
    from monai.transforms import AsDiscreted, Compose, Invertd

    pre = Compose(tutorial_transforms(cfg, keys=("image",)))
    post = Compose([Invertd(keys="pred", transform=pre, orig_keys="image", nearest_interp=False, to_tensor=True),
                    AsDiscreted(keys="pred", argmax=True)])
    data = list_data_collate([pre({"image": image_path})])
    net.eval()
    with torch.no_grad():
        data["pred"] = sliding_window_inference(data["image"], cfg["roi"], cfg["sw_batch_size"], net,
                                                overlap=cfg["overlap"])
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        out = [post(i) for i in decollate_batch(data)][0]
    return np.asarray(out["pred"].detach().cpu().numpy())[0].astype(np.uint8)


def preprocessed_space(cfg: dict, net, item: dict) -> np.ndarray:
    """Argmax of the sliding-window logits on an already preprocessed case (the 2 mm grid)."""
    import torch
    from monai.inferers import sliding_window_inference

    net.eval()
    with torch.no_grad():
        logits = sliding_window_inference(item["image"][None], cfg["roi"], cfg["sw_batch_size"], net,
                                          overlap=cfg["overlap"])
    return torch.argmax(logits, dim=1)[0].numpy().astype(np.uint8)


def dice_per_class(pred: np.ndarray, truth: np.ndarray, classes: int) -> list[float]:
    """MONAI's Dice of each foreground class (an empty class scores 0 against a non-empty one)."""
    import torch
    from monai.metrics import compute_dice

    one_hot = lambda a: torch.nn.functional.one_hot(  # noqa: E731
        torch.as_tensor(np.asarray(a, dtype=np.int64)), classes).movedim(-1, 0)[None]
    return [float(v) for v in compute_dice(one_hot(pred), one_hot(truth), include_background=False,
                                           ignore_empty=False)[0]]


def summary(per_case: list[list[float]]) -> dict[str, float]:
    classes = np.mean(np.asarray(per_case), axis=0)
    return {"dice": float(np.mean(np.mean(per_case, axis=1))),
            **{f"dice_{c}": float(v) for c, v in enumerate(classes, start=1)}}


def score(cfg: dict, vf: dict, monai_weights: str, cache: Path) -> dict[str, dict[str, float]]:
    """Both final models on the validation cases: original 1 mm grid (the metric) and the 2 mm grid."""
    import nibabel as nib
    import torch
    from monai.transforms import Compose

    from voxelflow.release import registry

    torch.set_num_threads(cfg["threads"])
    segmenter = registry.load_version(vf["tracking_uri"], vf["model"], vf["version"], cache)
    mo_net = build_unet(cfg)
    mo_net.load_state_dict(torch.load(monai_weights, weights_only=True))
    vf_net = segmenter.net
    classes = cfg["network"]["out_channels"]
    pre = Compose(tutorial_transforms(cfg))
    rows: dict[str, list[list[float]]] = {k: [] for k in ("voxelflow", "monai", "voxelflow_2mm", "monai_2mm",
                                                          "voxelflow_weights_tutorial_inversion")}
    for path in vf["val_images"]:
        img = nib.load(path)
        volume = np.asarray(img.dataobj, dtype=np.float32)
        truth = np.asarray(nib.load(path.replace("/imagesTr/", "/labelsTr/")).dataobj).astype(np.uint8)
        rows["voxelflow"].append(dice_per_class(segmenter.segment(volume, img.affine), truth, classes))
        rows["monai"].append(dice_per_class(tutorial_original_spacing(cfg, mo_net, path), truth, classes))
        rows["voxelflow_weights_tutorial_inversion"].append(
            dice_per_class(tutorial_original_spacing(cfg, vf_net, path), truth, classes))
        item = pre({"image": path, "label": path.replace("/imagesTr/", "/labelsTr/")})
        small = np.asarray(item["label"][0]).astype(np.uint8)
        rows["voxelflow_2mm"].append(dice_per_class(preprocessed_space(cfg, vf_net, item), small, classes))
        rows["monai_2mm"].append(dice_per_class(preprocessed_space(cfg, mo_net, item), small, classes))
    return {k: summary(v) for k, v in rows.items()}


# --------------------------------------------------------------------------------------------- main


def settings_from_spec(epochs: int, threads: int, seed: int) -> dict:
    """What both sides share, read from the voxelflow spec so the two cannot drift apart."""
    from voxelflow.spec.config import load_spec

    spec = load_spec(SPEC, sets=[f"train.epochs={epochs}"])
    (net_name, network), = spec.train.network.items()
    (loss_name, _), = spec.train.loss.items()
    (opt_name, opt_args), = spec.train.optimizer.items()
    spacing = next(v for t in spec.preprocess.transforms for k, v in t.items() if k == "Spacingd")
    crop = next(v for t in spec.train.augment for k, v in t.items() if k == "RandCropByPosNegLabeld")
    window = spec.evaluate.sliding_window
    if (net_name, loss_name, opt_name, opt_args, spec.train.precision) != ("UNet", "DiceCELoss", "Adam", {}, "fp32"):
        raise SystemExit(f"{SPEC.name}: the MONAI script is written for a UNet, DiceCELoss, Adam and fp32")
    return {"network": network, "pixdim": spacing["pixdim"], "patch": crop["spatial_size"],
            "num_samples": crop["num_samples"], "batch_size": spec.train.batch_size,
            "learning_rate": spec.train.learning_rate, "val_every": spec.train.val_every, "seed": seed,
            "roi": window.roi_size, "overlap": window.overlap, "sw_batch_size": window.sw_batch_size,
            "threads": threads, "epochs": epochs}


def run_side(side: str, cfg: dict, work: Path, idle_wait: float) -> dict:
    """One side in a fresh Python process (once the machine is idle, or ``idle_wait`` s have passed); its
    stdout goes to our stderr, its result comes back as JSON with the CPU other processes took meanwhile."""
    inp, out = work / f"{side}-in.json", work / f"{side}-out.json"
    inp.write_text(json.dumps(cfg))
    out.unlink(missing_ok=True)
    waited = wait_until_idle(idle_wait)
    with ForeignCpu() as foreign:
        subprocess.run([sys.executable, __file__, "--side", side, str(inp), str(out)], check=True,
                       stdout=sys.stderr)
    return {**json.loads(out.read_text()), "waited_for_idle_s": round(waited, 1),
            "other_processes_cpu_s": round(foreign.seconds, 1), "other_processes_cpu_share": round(foreign.share, 3)}


def child(side: str, inp: str, out: str) -> None:
    warnings.filterwarnings("ignore", category=FutureWarning)
    cfg = json.loads(Path(inp).read_text())
    rss = TreeRSS()
    result = voxelflow_side(cfg) if side == "voxelflow" else monai_side(cfg)
    Path(out).write_text(json.dumps({**result, "rss": rss.result()}))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--cases", type=int, default=16, help="volumes to build (at least 12 for the metric)")
    parser.add_argument("--epochs", type=int, default=24, help="voxelflow's train.epochs; it sets the budget T "
                        "(without --budget)")
    parser.add_argument("--budget", type=float, help="both sides get this wall time in seconds: voxelflow's training "
                        f"ends by train.max_seconds ({BUDGET_EPOCHS} epochs planned); the metric line is "
                        f"train_quality_vs_monai_long for a budget of {LONG_BUDGET_S:.0f} s or more, "
                        "train_quality_vs_monai below")
    parser.add_argument("--threads", type=int, default=os.cpu_count() or 1, help="torch threads of each side")
    parser.add_argument("--seed", type=int, default=0, help="data, initial weights, sampling")
    parser.add_argument("--workdir", type=Path, help="where data, stores and models go (default: a temporary folder); "
                        "the data is kept there and reused by the next run")
    parser.add_argument("--keep", action="store_true", help="also keep voxelflow's home (store, database, MLflow) "
                        "and the models")
    parser.add_argument("--monai-workers", type=int, default=0, help="DataLoader worker processes of the MONAI "
                        "script's training loader (voxelflow's spec: 0, a thread-buffered loader)")
    parser.add_argument("--idle-wait", type=float, default=120.0, help="before each side, wait up to this many "
                        "seconds for the machine to be idle")
    parser.add_argument("--quick", action="store_true", help="a smoke run: 12 cases, 2 epochs")
    parser.add_argument("--side", nargs=3, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.side:
        return child(*args.side)
    if args.quick:
        args.cases, args.epochs = 12, 2
    if args.budget is not None:
        if args.budget <= 0:
            parser.error("--budget must be a positive number of seconds")
        args.epochs = BUDGET_EPOCHS
    work = args.workdir or Path(tempfile.mkdtemp(prefix="voxelflow-quality-"))
    work.mkdir(parents=True, exist_ok=True)
    try:
        cfg = settings_from_spec(args.epochs, args.threads, args.seed)
        began = time.perf_counter()
        files = make_dataset(work / "data", args.cases, args.seed)
        emit({"data": f"{len(files)} cases of 197x233x189 at 1 mm (MNI152 2009, deformed)",
              "seconds": round(time.perf_counter() - began, 1), "threads": args.threads, "cores": os.cpu_count()})

        vf = run_side("voxelflow", {**cfg, "home": str(work / "home"), "data": str(work / "data"),
                                    "budget": args.budget}, work, args.idle_wait)
        if args.budget is not None:
            emit({"side": "voxelflow", "budget": args.budget, "seconds_T": round(vf["seconds"], 1),
                  "within_budget": vf["seconds"] <= args.budget, "train_max_seconds": round(vf["train_max_seconds"], 1),
                  "train_seconds": round(vf["train_seconds"], 1), "stopped_for_time": vf["stopped_for_time"],
                  "evaluate_estimate_s": round(vf["evaluate_estimate_s"], 1),
                  "evaluate_s": vf["stages_s"]["evaluate"]})
        budget = vf["seconds"] if args.budget is None else args.budget
        emit({"side": "voxelflow", "seconds_T": round(vf["seconds"], 1), "stages_s": vf["stages_s"],
              "epochs": vf["epochs"], "steps": vf["steps"],
              "train_steps_per_s": round(vf["steps"] / vf["train_seconds"], 3),
              "best_after_epochs": None if vf["best_epoch"] is None else vf["best_epoch"] + 1,
              "best_val_dice_in_training": round(vf["best_val_dice_2mm"], 4),
              "train_cases": len(vf["train_images"]), "val_cases": len(vf["val_images"]),
              "own_evaluation": {k: round(v, 4) for k, v in vf["evaluation"].items()},
              "registered": f"{vf['model']} v{vf['version']}", "peak_rss": vf["rss"],
              **{k: vf[k] for k in ("waited_for_idle_s", "other_processes_cpu_s", "other_processes_cpu_share")}})

        weights = work / "models" / "monai-best.pt"
        weights.parent.mkdir(exist_ok=True)
        mo = run_side("monai", {**cfg, "budget": budget, "train_images": vf["train_images"],
                                "val_images": vf["val_images"], "weights": str(weights),
                                "loader_workers": args.monai_workers}, work, args.idle_wait)
        emit({"side": "monai", "seconds": round(mo["seconds"], 1), "budget_T": round(budget, 1),
              "load_seconds": round(mo["load_seconds"], 1), "epochs": mo["epochs"],
              "partial_epoch_steps": mo["partial_epoch_steps"], "steps": mo["steps"],
              "train_steps_per_s": round(mo["steps"] / (mo["seconds"] - mo["load_seconds"]), 3),
              "validations": mo["validations"], "best_after_epochs": mo["best_epoch"],
              "best_val_dice_in_training": round(mo["best_val_dice_2mm_tutorial_metric"], 4), "peak_rss": mo["rss"],
              **{k: mo[k] for k in ("waited_for_idle_s", "other_processes_cpu_s", "other_processes_cpu_share")}})

        scores = score(cfg, vf, str(weights), work / "models")
        for name, values in scores.items():
            emit({"scores": name, **{k: round(v, 4) for k, v in values.items()}})
        own = vf["evaluation"]["dice"]  # the lifecycle's own evaluation stage: the same cases, grid and labels
        if abs(own - scores["voxelflow"]["dice"]) > 1e-4:
            emit({"warning": f"voxelflow's evaluation gave {own:.4f}, the benchmark's scoring of its registered "
                             f"model {scores['voxelflow']['dice']:.4f}"})
        metric = own / scores["monai"]["dice"]
        name = "train_quality_vs_monai_long" if (args.budget or 0) >= LONG_BUDGET_S else "train_quality_vs_monai"
        emit({"metric": name, "value": round(metric, 4), "goal": 1.0, "higher_is_better": True,
              **({} if args.budget is None else {"budget_s": args.budget})})
    finally:
        if args.keep:
            print(f"kept: {work}", file=sys.stderr)
        elif args.workdir:
            for name in ("home", "models"):
                shutil.rmtree(work / name, ignore_errors=True)
        else:
            shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
