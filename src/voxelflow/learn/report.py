"""Pictures people would rather look at: overlays of image, label and prediction; training curves."""

from __future__ import annotations

import io

import numpy as np


def _figure(width: float, height: float, ncols: int = 1):
    """A figure on its own Agg canvas: no global backend switch, so notebooks keep theirs."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(width, height))
    FigureCanvasAgg(fig)
    return fig, fig.subplots(1, ncols)


def overlay_png(image: np.ndarray, label: np.ndarray | None, pred: np.ndarray | None, title: str = "") -> bytes:
    """The middle axial slice: image, image+label, image+prediction side by side."""
    z = int(np.argmax((label > 0).sum(axis=(0, 1)))) if label is not None and label.any() else image.shape[2] // 2
    panels = [("image", None), ("label", label), ("prediction", pred)]
    panels = [(n, m) for n, m in panels if n == "image" or m is not None]
    fig, axes = _figure(3.2 * len(panels), 3.4, len(panels))
    for ax, (name, mask) in zip(np.atleast_1d(axes), panels):
        ax.imshow(image[:, :, z].T, cmap="gray", origin="lower")
        if mask is not None:
            ax.imshow(np.ma.masked_equal(mask[:, :, z].T, 0), cmap="autumn", alpha=0.5, origin="lower")
        ax.set_title(name)
        ax.axis("off")
    if title:
        fig.suptitle(title)
    fig.tight_layout()
    return _png(fig)


def curve_png(history: list[dict[str, float]], key: str = "train_loss") -> bytes:
    fig, ax = _figure(4.5, 3.2)
    ax.plot([h["epoch"] + 1 for h in history], [h[key] for h in history], marker=".")
    ax.set_xlabel("epoch")
    ax.set_ylabel(key)
    ax.set_title("training curve")
    ax.grid(alpha=0.3)
    fig.tight_layout()
    return _png(fig)


def _png(fig) -> bytes:
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=80)
    return buf.getvalue()
