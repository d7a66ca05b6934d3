"""The deployable model: network spec + safetensors weights + the preprocessing it was trained with.

:class:`Segmenter` takes a raw volume and its affine, applies its own preprocessing, runs
sliding-window inference and maps the mask back to the input's grid. :class:`SegmentationModel`
packages it as an MLflow pyfunc that loads weights without pickle.
"""

from __future__ import annotations

import json
import warnings
from pathlib import Path
from typing import Any

import numpy as np

try:  # the library stays importable where only the client side of MLflow is missing
    from mlflow.pyfunc import PythonModel
except ImportError:  # pragma: no cover
    PythonModel = object  # type: ignore[assignment,misc]

from voxelflow.preprocess import build_transforms, to_meta
from voxelflow.train import autocast_for, load_network


class Segmenter:
    """Raw volume in, label mask (same grid) out."""

    def __init__(self, config: dict[str, Any], weights: bytes, device: str | None = None) -> None:
        self.config = config
        self.net = load_network(config["network"], weights, device)
        self.device = next(self.net.parameters()).device
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", FutureWarning)
            self.pre = build_transforms(config["transforms"], keys=("image",))
        window = config.get("sliding_window") or {"roi_size": config["spatial_size"]}  # older models: no window
        self.roi_size = tuple(window["roi_size"])
        self.window = {"overlap": window.get("overlap", 0.25), "sw_batch_size": window.get("sw_batch_size", 4),
                       "mode": window.get("mode", "constant")}

    @classmethod
    def from_dir(cls, path: str | Path, device: str | None = None) -> Segmenter:
        path = Path(path)
        config = json.loads((path / "model.json").read_text())
        return cls(config, (path / "weights.safetensors").read_bytes(), device)

    def logits(self, batch):
        """Sliding-window logits for an already preprocessed batch (N, C, *spatial)."""
        import torch
        from monai.inferers import sliding_window_inference

        with torch.no_grad(), autocast_for(self.config.get("precision", "fp32"), self.device):
            out = sliding_window_inference(batch.to(self.device), self.roi_size, predictor=self.net, **self.window)
        return out.float()

    def segment(self, volume: np.ndarray, affine: np.ndarray | None = None) -> np.ndarray:
        import torch
        from monai.data import MetaTensor
        from monai.transforms import Invertd

        if volume.ndim != 3:
            raise ValueError(f"expected a 3-D volume, got shape {volume.shape}")
        affine = np.eye(4) if affine is None else np.asarray(affine, dtype=np.float64)
        item = self.pre({"image": to_meta(np.asarray(volume, dtype=np.float32), affine)})
        image = item["image"]
        pred = torch.argmax(self.logits(image[None].as_tensor()), dim=1).to(torch.uint8).cpu()
        pred = MetaTensor(pred, meta=dict(image.meta))
        pred.applied_operations = list(image.applied_operations)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            out = Invertd(keys="pred", transform=self.pre, orig_keys="image", nearest_interp=True)(
                {"pred": pred, "image": image}
            )
        mask = np.asarray(out["pred"].detach().cpu().numpy())[0]
        return np.rint(mask).astype(np.uint8)


class SegmentationModel(PythonModel):
    """MLflow pyfunc wrapper: ``predict`` takes a 3-D volume (voxel grid = identity affine)."""

    _skip_type_hint_validation = True  # the tensor signature is given explicitly at log time

    def load_context(self, context) -> None:
        self.segmenter = Segmenter.from_dir(Path(context.artifacts["model.json"]).parent)

    def predict(self, context, model_input, params=None):
        return self.segmenter.segment(np.asarray(model_input))
