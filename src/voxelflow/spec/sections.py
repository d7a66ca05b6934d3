"""The stage sections of the spec: data, preprocess, train, evaluate, promote and deploy, with their parts.

Each stage reads only its own section; :class:`voxelflow.spec.config.PipelineSpec` puts them together.
"""

from __future__ import annotations

import inspect
import math
import re
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from voxelflow.spec import checked
from voxelflow.spec.components import (
    Component,
    Components,
    _check_kwargs,
    _check_types,
    _dict_transforms,
    _mask_transforms,
    _single_key,
    _torch_component,
    allowed_imports,
    component_kind,
    kept_component,
    resolve_callable,
    resolve_monai,
)
from voxelflow.spec.step_spec import WORK_POOL


class _Section(BaseModel):
    model_config = ConfigDict(extra="forbid")


class _Stage(_Section):
    work_pool: str | None = Field(
        None,
        pattern=WORK_POOL,
        description="run this stage as its own flow run on this work pool (deployment STAGE/WORK_POOL); "
        "unset: in the lifecycle's own process", examples=["gpu"],
    )


class Accept(_Section):
    """Which received series clinical inference segments; the others are recorded as skipped, with the reason."""

    modalities: list[str] = Field(default_factory=list, description="Modality values accepted (e.g. CT); empty: any",
                                  examples=[["CT"]])
    body_parts: list[str] = Field(default_factory=list, description="BodyPartExamined values accepted (case "
                                  "insensitive); empty: any", examples=[["ABDOMEN", "CHEST"]])
    min_slices: int = Field(1, ge=1, description="fewest slices (frames of the series' instances) accepted")
    max_slices: int | None = Field(None, ge=1, description="most slices accepted; unset: no bound but "
                                   "data.max_voxels")

    @model_validator(mode="after")
    def _order(self) -> Accept:
        if self.max_slices is not None and self.max_slices < self.min_slices:
            raise ValueError(f"max_slices ({self.max_slices}) is below min_slices ({self.min_slices})")
        return self


class DataSpec(_Stage):
    source: str = Field(description="fsspec URL of the incoming data; '{home}' expands to VOXELFLOW_HOME")
    layout: Literal["decathlon", "folder", "dicom", "mixed"] = Field(
        "decathlon", description="decathlon (dataset.json), folder (one folder per case), dicom (any tree, by series) "
        "or mixed (what dataset.json names, if there is one, and every other file as DICOM)"
    )
    max_voxels: int = Field(512**3, gt=0, description="cases larger than this are quarantined")
    max_series_files: int = Field(4096, gt=0, description="DICOM series of more objects than this are quarantined "
                                  "too-large from their headers, before any pixel is fetched")
    deidentify: Literal["basic-profile", "none"] = Field(
        "basic-profile", description="basic-profile: DICOM is de-identified (PS3.15 Annex E basic profile, keyed UIDs) "
        "before anything is stored; none: DICOM is kept as it arrived (needs deidentify_acknowledged; warns every run)")
    deidentify_acknowledged: str | None = Field(
        None, description="with deidentify: none, a statement that the data is already de-identified or that "
        "consent covers it (recorded in the audit log at every ingest)",
        examples=["exported de-identified by the hospital's PACS gateway (DPA 2024-17)"])
    accept: Accept | None = Field(
        None, description="received series (voxelflow receive, the DICOMweb watcher) that clinical inference "
        "segments; unset: every one")

    @property
    def needs_deid_key(self) -> bool:
        """Whether an ingest may meet DICOM to de-identify (and so needs the UID remapping key)."""
        return self.layout in ("dicom", "mixed") and self.deidentify != "none"

    @model_validator(mode="after")
    def _acknowledged(self) -> DataSpec:
        ack = (self.deidentify_acknowledged or "").strip()
        if self.deidentify == "none" and not ack:
            raise ValueError("deidentify: none turns DICOM de-identification off and needs deidentify_acknowledged: "
                             "a statement that the data is already de-identified or that consent covers it")
        if self.deidentify != "none" and self.deidentify_acknowledged is not None:
            raise ValueError("deidentify_acknowledged applies only with deidentify: none (de-identification is on)")
        return self


class Adaptive(_Section):
    minimum: int = Field(1, ge=0, description="fewest Dask workers the started cluster scales down to")
    maximum: int = Field(4, ge=1, description="most Dask workers it scales up to (on cuda, never more than GPUs)")

    @model_validator(mode="after")
    def _order(self) -> Adaptive:
        if self.maximum < self.minimum:
            raise ValueError("maximum must be at least minimum")
        return self


class PreprocessSpec(_Stage):
    transforms: Components = Field(
        min_length=1, description="MONAI dictionary transforms (by name or import path package.module:Class) "
        "applied in order, once per case, and stored; deterministic only, each with its keys"
    )
    shard_size: int = Field(8, ge=1, description="cases per Dask task")
    cluster: str = Field("auto", description="auto (a local cluster, on GPUs when device is cuda; the "
                         "VOXELFLOW_DASK_SCHEDULER cluster when set; on the CPU, new cases start in the lifecycle's "
                         "process and move onto a local cluster only once the time they take predicts it ends "
                         "sooner, its start included) | local | cuda | tcp://scheduler:8786")
    device: Literal["cpu", "cuda"] = Field(
        "cpu", description="where the transforms run; cuda: on the workers' GPUs (LocalCUDACluster under auto)"
    )
    adaptive: Adaptive | None = Field(
        None, description="scale a cluster voxelflow starts between minimum and maximum workers"
    )

    @field_validator("transforms", mode="before")
    @classmethod
    def _normalise(cls, value: Any) -> list[dict[str, dict[str, Any]]]:
        if not isinstance(value, list) or not value:
            raise ValueError("expected a non-empty list of MONAI dictionary transforms")
        return _dict_transforms(value, "preprocess.transforms", random=False)

    @field_validator("cluster")
    @classmethod
    def _cluster(cls, value: str) -> str:
        if value in ("auto", "local", "cuda") or value.startswith(("tcp://", "tls://")):
            return value
        raise ValueError("expected auto, local, cuda or a scheduler address tcp://host:port")

    @property
    def spatial_size(self) -> tuple[int, ...] | None:
        """The fixed output size, from the last transform that sets one."""
        size = None
        for item in self.transforms:
            for kwargs in item.values():
                if "spatial_size" in kwargs:
                    size = tuple(int(s) for s in kwargs["spatial_size"])
        return size


class TrainSpec(_Stage):
    network: Component = Field(description="a MONAI network (monai.networks.nets) by name, or a torch.nn.Module "
                               "by import path package.module:Class, with its constructor's arguments")
    loss: Component = Field(
        default_factory=lambda: {"DiceCELoss": {}},
        validate_default=True,  # the validator below fills in the Dice-family defaults
        description="a MONAI loss by name; Dice-family losses default to to_onehot_y and softmax",
    )
    epochs: int = Field(50, ge=1, description="passes over the training side (fewer with patience)")
    batch_size: int = Field(2, ge=1, description="cases per optimizer step (each giving num_samples patches when "
                            "augment samples patches)")
    learning_rate: float = Field(1e-3, gt=0, description="the optimizer's lr unless optimizer sets its own")
    optimizer: Component = Field(
        default_factory=lambda: {"Adam": {}}, validate_default=True,
        description="a torch.optim optimizer by name with its arguments; lr defaults to learning_rate")
    scheduler: Component | None = Field(
        None, description="a torch.optim.lr_scheduler by name with its arguments, stepped once per epoch; "
        "null: a constant learning rate", examples=[{"CosineAnnealingLR": {"T_max": 50}}])
    precision: Literal["auto", "fp32", "bf16-mixed", "fp16-mixed"] = Field(
        "auto", description="auto: bf16-mixed on a GPU with bf16 (else fp16-mixed), fp32 on a CPU, whose bf16 "
        "convolutions are emulated and slow; fp16-mixed needs a CUDA device (with a GradScaler), the CPU refuses it")
    checkpoint_every_steps: int = Field(50, ge=1, description="save a checkpoint (training resumes from the "
                                        "last one) every this many optimizer steps, and at the end")
    seed: int = Field(0, description="initial weights, data order and augmentation; never the split")
    augment: Components = Field(
        default_factory=list, description="MONAI random dictionary transforms by name, applied to each training "
        "case as it is drawn: augmentation and patch sampling (RandCropByPosNegLabeld, RandSpatialCropSamplesd; "
        "num_samples patches per case, so a step sees batch_size x num_samples patches)")
    cache_mb: int = Field(2048, ge=0, description="memory for preprocessed training and validation cases held "
                          "between epochs (on the GPU when training runs there); cases beyond it are read from "
                          "the store each time they are drawn")
    workers: int = Field(0, ge=0, description="DataLoader worker processes that read and augment cases ahead of "
                         "the step; 0: in the training process (a thread-buffered loader)")
    val_every: int = Field(1, ge=1, description="validate (sliding window, on the validation cases) every this "
                           "many epochs; the best validation keeps its weights, which are what gets registered")
    patience: int | None = Field(None, ge=1, description="stop after this many validations without improvement; "
                                 "null: train every epoch", examples=[10])
    max_seconds: float | None = Field(
        None, description="a time budget in seconds (Lightning's max_time): at an epoch's end, training stops when "
        "one more epoch (the mean epoch so far, with a validation) would pass it; the last epoch is validated, so "
        "the best weights consider all the training, and the run ends as a finished one (stopped for time). At "
        "least one epoch is trained; null: no limit", examples=[3600])
    devices: Literal["auto", "cpu"] | int = Field(
        "auto", description="auto: every GPU (DistributedDataParallel when there are several), else the CPU; "
        "cpu: one CPU process; N: N processes, one per GPU, or gloo processes on the CPU. Each step's batch "
        "is split between the processes (batch_size must be a multiple of N) and an epoch takes full batches")
    collective_timeout_s: int = Field(
        300, ge=1, le=1800, description="with several processes: longest a training step's collective (gradient "
        "all-reduce, loss) may wait for the other processes before the training fails; the rendezvous and the wait "
        "for rank 0's validation keep torch's 30 minutes")
    deterministic: bool = Field(
        False, description="on CUDA: deterministic cuDNN algorithms, no cuDNN autotuning, TF32 off, torch's "
        "deterministic algorithms (warn only) and CUBLAS_WORKSPACE_CONFIG=:4096:8, so a resumed run ends with the "
        "uninterrupted one's weights bit for bit (slower); false: a resumed run matches to float tolerance. The CPU "
        "is deterministic either way")

    @field_validator("max_seconds")
    @classmethod
    def _max_seconds(cls, value: float | None) -> float | None:
        if value is not None and not (math.isfinite(value) and value > 0):
            raise ValueError(f"train.max_seconds must be a positive number of seconds (got {value}); leave it unset "
                             "(null) for no time limit")
        return value

    @field_validator("devices")
    @classmethod
    def _devices(cls, value: str | int) -> str | int:
        if isinstance(value, int) and value < 1:
            raise ValueError("devices must be auto, cpu or a number of processes (at least 1)")
        return value

    @model_validator(mode="after")
    def _batch_splits(self) -> TrainSpec:
        if isinstance(self.devices, int) and self.batch_size % self.devices:
            raise ValueError(f"batch_size {self.batch_size} does not split between {self.devices} devices: use a "
                             "multiple of devices")
        return self

    @field_validator("network", mode="before")
    @classmethod
    def _network(cls, value: Any) -> dict[str, dict[str, Any]]:
        if checked.is_trusted():
            return kept_component(value, "network")
        name, kwargs = _single_key(value, "network")
        net = resolve_monai("monai.networks.nets", name, "network", allowed_imports())
        _check_kwargs(net, name, kwargs, "network")
        _check_types(net.__init__, name, kwargs, "network")
        return {name: kwargs}

    @field_validator("optimizer", mode="before")
    @classmethod
    def _optimizer(cls, value: Any) -> dict[str, dict[str, Any]]:
        return _torch_component(value, "torch.optim", "optimizer", {"params"})

    @field_validator("scheduler", mode="before")
    @classmethod
    def _scheduler(cls, value: Any) -> dict[str, dict[str, Any]] | None:
        if value is None:
            return None
        name, _ = _single_key(value, "scheduler")
        if name == "ReduceLROnPlateau":
            raise ValueError("scheduler 'ReduceLROnPlateau' needs a validation metric each epoch, which training "
                             "does not compute; choose an epoch-driven scheduler (StepLR, CosineAnnealingLR, ...)")
        return _torch_component(value, "torch.optim.lr_scheduler", "scheduler", {"optimizer"})

    @field_validator("augment", mode="before")
    @classmethod
    def _augment(cls, value: Any) -> list[dict[str, dict[str, Any]]]:
        return _dict_transforms(value or [], "train.augment", random=True)

    @property
    def patch_size(self) -> tuple[int, ...] | None:
        """The size of the patches ``augment`` samples, from the last transform that sets one."""
        size = None
        for item in self.augment:
            for kwargs in item.values():
                for key in ("spatial_size", "roi_size"):
                    if key in kwargs and isinstance(kwargs[key], (list, tuple)):
                        size = tuple(int(s) for s in kwargs[key])
        return size

    @field_validator("loss", mode="before")
    @classmethod
    def _loss(cls, value: Any) -> dict[str, dict[str, Any]]:
        if checked.is_trusted():  # its defaults from the class's signature are in the kept form already
            return kept_component(value, "loss")
        name, kwargs = _single_key(value, "loss")
        cls = resolve_monai("monai.losses", name, "loss", allowed_imports())
        _check_kwargs(cls, name, kwargs, "loss")
        _check_types(cls.__init__, name, kwargs, "loss")
        params = inspect.signature(cls.__init__).parameters
        if "to_onehot_y" in params and "softmax" in params:  # labels are class indices, outputs logits
            kwargs = {"to_onehot_y": True, "softmax": True, **kwargs}
        return {name: kwargs}


def metric_names(metrics: list[str], n_classes: int) -> list[str]:
    """Every score evaluation reports: each metric's mean over foreground classes, then one per class."""
    names = []
    for m in metrics:
        names.append(m)
        names.extend(f"{m}_{c}" for c in range(1, n_classes))
    return names


class SlidingWindow(_Section):
    """MONAI ``SlidingWindowInferer`` settings: validation during training, evaluation and the served model."""

    roi_size: list[int] | None = Field(None, min_length=1, description="window size in voxels; default: the "
                                       "training patch size, else the size preprocessing fixes")
    overlap: float = Field(0.25, ge=0, lt=1, description="fraction by which neighbouring windows overlap")
    sw_batch_size: int = Field(4, ge=1, description="windows run through the network at once")
    mode: Literal["constant", "gaussian"] = Field("constant", description="how overlapping windows are blended: "
                                                  "constant (equal weights) or gaussian (the centre weighs most)")


BUILTIN_METRICS = {"dice": True, "hausdorff95": False}  # name -> higher is better


class CustomMetric(_Section):
    """A metric of the user's, by import path: a MONAI-style function ``fn(y_pred, y, **args)`` (like
    ``monai.metrics:compute_iou``) or metric class (``monai.metrics:MeanIoU``, called as
    ``metric(y_pred, y)``), given one-hot tensors of shape (1, classes, *spatial) and returning one
    value per class. ``include_background=False``, ``ignore_empty=False`` and the case's ``spacing``
    are passed where the signature takes them and ``args`` does not set them."""

    function: str = Field(description="import path package.module:name of the function or class",
                          examples=["monai.metrics:compute_iou"])
    higher_is_better: bool = Field(description="the metric's direction, for gates and the champion comparison",
                                   examples=[True])
    args: dict[str, Any] = Field(default_factory=dict, description="keyword arguments: the function's, or the "
                                 "class's constructor's", examples=[{"ignore_empty": False}])

    @model_validator(mode="after")
    def _resolves(self) -> CustomMetric:
        if checked.is_trusted():
            kept_component(self.function, "evaluate.custom_metrics function")
            return self
        fn = resolve_callable(self.function, "evaluate.custom_metrics function", allowed_imports())
        why = component_kind("metric", fn)
        if why:
            raise ValueError(f"metric {self.function!r} {why}")
        _check_kwargs(fn, self.function, self.args, "metric")
        _check_types(fn.__init__ if inspect.isclass(fn) else fn, self.function, self.args, "metric")
        return self

    def load(self) -> Any:
        return resolve_callable(self.function, "metric", allowed_imports())


def sides_problem(test_fraction: float, val_fraction: float) -> str | None:
    """Why the fractions cannot make the three sides (None when they can).

    Before the test side existed, the held-out cases were those below ``val_fraction``; the test side
    is the start of that range, so a ``test_fraction`` above ``val_fraction`` would test on cases an
    earlier model may have trained on.
    """
    if not (0 < test_fraction < 1 and 0 < val_fraction < 1):
        return (f"evaluate.test_fraction ({test_fraction}) and evaluate.val_fraction ({val_fraction}) must both "
                "be between 0 and 1")
    if test_fraction > val_fraction:
        return (f"evaluate.test_fraction ({test_fraction}) is above evaluate.val_fraction ({val_fraction}): the "
                "test side must lie within the cases held out before it existed, or an earlier champion may have "
                "trained on a test case; lower evaluate.test_fraction or raise evaluate.val_fraction")
    if test_fraction + val_fraction >= 1:
        return (f"evaluate.test_fraction ({test_fraction}) + evaluate.val_fraction ({val_fraction}) leave no "
                "training side: their sum must be below 1")
    return None


class EvaluateSpec(_Stage):
    metrics: list[str] = Field(default_factory=lambda: ["dice"], min_length=1, description="dice, hausdorff95, "
                               "or a name defined in custom_metrics")
    custom_metrics: dict[str, CustomMetric] = Field(default_factory=dict, description="name -> a user metric by "
                                                    "import path, with its direction")
    test_fraction: float = Field(0.2, gt=0, lt=1, description="cases whose split position is below this are the "
                                 "test side: the gates and the champion comparison decide on them alone; at most "
                                 "val_fraction, so that no earlier model has trained on a test case")
    val_fraction: float = Field(0.2, gt=0, lt=1, description="the next this much of positions are the validation "
                                "side (checkpoint selection, early stopping); the rest train")
    sliding_window: SlidingWindow = Field(default_factory=SlidingWindow, description="sliding-window inference "
                                          "of validation, evaluation and the served model")
    postprocess: Components = Field(
        default_factory=list, description="MONAI array transforms applied in order to the label map (shape "
        "(1, *spatial)) after the argmax, by name (KeepLargestConnectedComponent, FillHoles, RemoveSmallObjects) or "
        "import path package.module:Class; stored with the registered model, so evaluation, the service, batch "
        "prediction and MLflow serving give the same mask")

    @field_validator("postprocess", mode="before")
    @classmethod
    def _postprocess(cls, value: Any) -> list[dict[str, dict[str, Any]]]:
        return _mask_transforms(value, "evaluate.postprocess")

    @model_validator(mode="after")
    def _sides(self) -> EvaluateSpec:
        problem = sides_problem(self.test_fraction, self.val_fraction)
        if problem:
            raise ValueError(problem)
        return self

    @model_validator(mode="after")
    def _known_metrics(self) -> EvaluateSpec:
        for name in self.custom_metrics:
            if name in BUILTIN_METRICS:
                raise ValueError(f"evaluate.custom_metrics: {name!r} is a built-in metric; choose another name")
            if not re.fullmatch(r"[A-Za-z][A-Za-z0-9_]*", name) or re.search(r"_\d+$", name):
                raise ValueError(f"evaluate.custom_metrics: {name!r} is not a usable metric name (letters, digits "
                                 "and _, not ending in _<digits>, which names one class)")
            if name not in self.metrics:
                raise ValueError(f"evaluate.custom_metrics defines {name!r}, which evaluate.metrics does not list")
        for name in self.metrics:
            if name not in BUILTIN_METRICS and name not in self.custom_metrics:
                raise ValueError(f"evaluate.metrics: unknown metric {name!r}; built in: "
                                 f"{', '.join(BUILTIN_METRICS)}; or define it under evaluate.custom_metrics")
        if len(set(self.metrics)) != len(self.metrics):
            raise ValueError(f"evaluate.metrics lists a metric twice: {self.metrics}")
        return self

    def directions(self) -> dict[str, bool]:
        """Every listed metric -> True when higher is better."""
        return {m: BUILTIN_METRICS[m] if m in BUILTIN_METRICS else self.custom_metrics[m].higher_is_better
                for m in self.metrics}


class Gates(_Section):
    """The promotion policy (voxelflow.release.policy): every gate must pass."""

    min_dice: float | None = Field(0.8, ge=0, le=1, description="dice at least this; null: no dice gate")
    beat_champion_by: float = Field(
        0.0, ge=-1, le=1, description="relative gate on relative_metric: beat the champion by this much in the "
        "metric's better direction, case by case on the test side (the lower bound of the paired bootstrap "
        "interval must reach it); negative: non-inferiority, no worse than the champion by more than |value|")
    relative_metric: str = Field("dice", description="the metric the relative gate compares (dice, hausdorff95, "
                                 "dice_1, ...)")
    confidence: float = Field(
        0.95, gt=0, lt=1, description="relative gate: the level of the paired bootstrap interval (2000 resamples "
        "of the test cases) of candidate minus champion; its lower bound must clear beat_champion_by")
    min_test_cases: int = Field(5, ge=1, description="relative gate: fewer paired test cases than this fail it")
    absolute: dict[str, float] = Field(
        default_factory=dict, description="metric -> bound: at least for higher-is-better metrics (dice, dice_2), "
        "at most for lower-is-better ones (hausdorff95 in mm); <step>.<metric>: an own step's metric that its "
        "higher_is_better declares", examples=[{"dice_1": 0.7, "qc.outliers": 0}])
    flip_tolerance: float | None = Field(
        None, ge=0, le=1, description="run the behavioural checks on a held-out case: at most this fraction of "
        "voxels may change when the volume is mirrored left-right, an empty volume must give an empty mask, the "
        "output must be finite; null: checks not run", examples=[0.05])
    require_lineage: list[str] = Field(
        default_factory=lambda: ["dataset_digest", "spec_digest", "run_id"],
        description="lineage tags the version must carry to be promoted")

    def metrics(self) -> dict[str, str]:
        """Metric base name (dice, hausdorff95) -> the gate that reads it."""
        out = {"dice": "min_dice"} if self.min_dice is not None else {}
        for metric, gate in [*((m, f"absolute.{m}") for m in self.absolute), (self.relative_metric,
                                                                              "beat_champion_by")]:
            base = metric.rsplit("_", 1)[0] if metric.rsplit("_", 1)[-1].isdigit() else metric
            out.setdefault(base, gate)
        return out


class PromoteSpec(_Stage):
    model_name: str = Field(pattern=r"^[A-Za-z0-9][A-Za-z0-9_.-]*$", description="the MLflow registered model "
                            "the candidate becomes a version of; its champion alias is what is compared and served")
    gates: Gates = Field(default_factory=Gates, description="the promotion policy: every gate must pass")
    approval: Literal["auto", "manual"] = Field(
        "auto", description="manual: a candidate that passes the gates waits, the lifecycle paused, for a person's "
        "answer in the Prefect UI (approve or reject, with a reason) before `champion` moves")
    approval_timeout_s: int = Field(86400, ge=1, description="manual approval: how long the paused lifecycle waits "
                                    "for an answer; none by then counts as rejected")
    approval_poll_s: float = Field(10.0, gt=0, le=600, description="manual approval: how often the paused "
                                   "lifecycle looks for the answer")


class Autoscale(_Section):
    min_replicas: int = Field(2, ge=1, description="fewest pods the HorizontalPodAutoscaler keeps")
    max_replicas: int = Field(6, ge=1, description="most pods it scales to")
    metric: Literal["cpu", "queue_depth"] = Field(
        "cpu", description="cpu: average utilisation in percent of the request; queue_depth: requests waiting per "
        "pod (needs a metrics adapter serving voxelflow_queue_depth)")
    target: float = Field(70, gt=0, description="the value the autoscaler holds metric at: percent of the CPU "
                          "request, or waiting requests per pod")

    @model_validator(mode="after")
    def _order(self) -> Autoscale:
        if self.max_replicas < self.min_replicas:
            raise ValueError(f"max_replicas ({self.max_replicas}) is below min_replicas ({self.min_replicas})")
        return self


class KubernetesDeploy(_Section):
    image: str = Field("voxelflow:0.1.0", description="container image of the inference service")
    namespace: str = Field("voxelflow", pattern=r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?$",
                           description="namespace the service's objects are rendered into")
    alias: str = Field("champion", description="the registered model's alias the pods serve")
    secret: str = Field("voxelflow-runtime", description="Secret with VOXELFLOW_STORE, VOXELFLOW_DATABASE_URL, "
                        "VOXELFLOW_MLFLOW_TRACKING_URI")
    gpu: int = Field(0, ge=0, description="nvidia.com/gpu per pod")
    gpu_node_selector: dict[str, str] = Field(default_factory=lambda: {"nvidia.com/gpu.present": "true"},
                                              description="node labels GPU pods are scheduled on (with gpu > 0)")
    cpu_request: str = Field("1", description="CPU request per pod (Kubernetes quantity)")
    memory_request: str = Field("2Gi", description="memory request per pod (Kubernetes quantity)")
    cpu_limit: str = Field("4", description="CPU limit per pod (Kubernetes quantity)")
    memory_limit: str = Field("8Gi", description="memory limit per pod (Kubernetes quantity)")
    autoscale: Autoscale = Field(default_factory=Autoscale, description="the HorizontalPodAutoscaler")
    allowed_namespaces: list[str] = Field(default_factory=lambda: ["gateway"], min_length=1,
                                          description="namespaces whose pods may call the service")
    egress_ports: list[int] = Field(default_factory=lambda: [443, 5432],
                                    description="ports the pods may reach outside: object store, database")


class DeploySpec(_Stage):
    target: Literal["local", "kubernetes"] = Field(
        "local", description="local: the service on 127.0.0.1 and an HTTP smoke test; kubernetes: manifests "
        "rendered from deploy.kubernetes and applied to the configured cluster")
    kubernetes: KubernetesDeploy | None = Field(None, description="the Kubernetes deployment (with target: "
                                                 "kubernetes; its defaults when omitted)")

    @model_validator(mode="after")
    def _target(self) -> DeploySpec:
        if self.target == "kubernetes" and self.kubernetes is None:
            self.kubernetes = KubernetesDeploy()
        if self.target == "local" and self.kubernetes is not None:
            raise ValueError("deploy.kubernetes applies only to deploy.target: kubernetes")
        return self
