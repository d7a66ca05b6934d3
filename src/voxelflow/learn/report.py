"""Pictures people would rather look at: overlays of image, label and prediction; training curves."""

from __future__ import annotations

import io
import math

import numpy as np


def overlay_png(image: np.ndarray, label: np.ndarray | None, pred: np.ndarray | None, title: str = "") -> bytes:
    """The axial slice with the most label (the middle one without a label): image, image+label and
    image+prediction side by side, masks in red to yellow by class at half opacity.

    Drawn with Pillow from the arrays (a few milliseconds, against 0.2-0.35 s for the same figure through
    matplotlib), so the overlays training logs beside its steps take next to nothing from them."""
    from PIL import Image, ImageDraw

    z = int(np.argmax((label > 0).sum(axis=(0, 1)))) if label is not None and label.any() else image.shape[2] // 2
    panels = [("image", None), ("label", label), ("prediction", pred)]
    panels = [(n, m) for n, m in panels if n == "image" or m is not None]
    plane = np.asarray(image[:, :, z], dtype=np.float32).T[::-1]  # rows: last axis up, as radiologists see it
    finite = plane[np.isfinite(plane)]
    low, high = (float(finite.min()), float(finite.max())) if finite.size else (0.0, 0.0)
    grey = np.nan_to_num((plane - low) / (high - low) * 255 if high > low else np.zeros_like(plane))
    grey = np.repeat(grey.astype(np.uint8)[..., None], 3, axis=2)
    scale = max(1, 256 // max(plane.shape))
    font, pad, head = _font(), 8, 22
    top = head + (head if title else 0)
    w, h = plane.shape[1] * scale, plane.shape[0] * scale
    canvas = Image.new("RGB", (len(panels) * (w + pad) + pad, h + top + pad), "white")
    draw = ImageDraw.Draw(canvas)
    if title:
        draw.text((canvas.width / 2, 4), title, fill="black", font=font, anchor="ma")
    for i, (name, mask) in enumerate(panels):
        rgb = grey.copy()
        if mask is not None:
            m = np.asarray(mask[:, :, z]).T[::-1]
            rgb = _blend(rgb, m)
        x = pad + i * (w + pad)
        canvas.paste(Image.fromarray(rgb).resize((w, h), Image.NEAREST), (x, top))
        draw.text((x + w / 2, top - 4), name, fill="black", font=font, anchor="md")
    return _save(canvas)


def _blend(rgb: np.ndarray, mask: np.ndarray) -> np.ndarray:
    """The classes of ``mask`` over ``rgb`` at half opacity: the lowest present class red, the highest
    yellow (matplotlib's autumn map), background left as it is."""
    classes = [int(v) for v in np.unique(mask) if v != 0]
    if not classes:
        return rgb
    out = rgb.astype(np.float32)
    span = max(classes) - min(classes)
    for c in classes:
        colour = np.array([255.0, 255.0 * (c - min(classes)) / span if span else 0.0, 0.0], dtype=np.float32)
        where = mask == c
        out[where] = 0.5 * out[where] + 0.5 * colour
    return out.astype(np.uint8)


def _font():
    from PIL import ImageFont

    try:
        return ImageFont.load_default(size=14)
    except TypeError:  # Pillow before 10.1: the bitmap font, one size
        return ImageFont.load_default()


def curve_png(history: list[dict[str, float]], key: str = "train_loss") -> bytes:
    """``key`` by epoch as a line with a point per epoch, on a grid with its ticks (Pillow, a few ms:
    training draws it on its way out, so it is on the stage's critical path)."""
    from PIL import Image, ImageDraw

    xs = [h["epoch"] + 1 for h in history if math.isfinite(float(h.get(key, math.nan)))]
    ys = [float(h[key]) for h in history if math.isfinite(float(h.get(key, math.nan)))]
    font = _font()
    width, height, left, right, top, bottom = 480, 320, 64, 16, 50, 46
    canvas = Image.new("RGB", (width, height), "white")
    draw = ImageDraw.Draw(canvas)
    draw.text((width / 2, 8), "training curve", fill="black", font=font, anchor="ma")
    draw.text((left + (width - left - right) / 2, height - 6), "epoch", fill="black", font=font, anchor="md")
    draw.text((6, 26), key, fill="black", font=font)
    x0, x1, y0, y1 = left, width - right, height - bottom, top  # plot box, y grows upwards
    if not ys:
        draw.rectangle((x0, y1, x1, y0), outline="black")
        draw.text(((x0 + x1) / 2, (y0 + y1) / 2), "no finite values", fill="grey", font=font, anchor="mm")
        return _save(canvas)
    ticks = _ticks(min(ys), max(ys))
    low, high = ticks[0], ticks[-1]
    first, last = min(xs), max(xs)

    def at(x: float, y: float) -> tuple[float, float]:
        fx = 0.5 if last == first else (x - first) / (last - first)
        return x0 + 8 + fx * (x1 - x0 - 16), y0 - (y - low) / (high - low) * (y0 - y1)

    for t in ticks:
        _, py = at(first, t)
        draw.line((x0, py, x1, py), fill=(225, 225, 225))
        draw.text((x0 - 6, py), f"{t:.3g}", fill="black", font=font, anchor="rm")
    step = max(1, math.ceil((last - first + 1) / 8))
    for e in range(int(first), int(last) + 1, step):
        px, _ = at(e, low)
        draw.line((px, y0, px, y0 + 4), fill="black")
        draw.text((px, y0 + 6), str(e), fill="black", font=font, anchor="ma")
    draw.rectangle((x0, y1, x1, y0), outline="black")
    points = [at(x, y) for x, y in zip(xs, ys)]
    if len(points) > 1:
        draw.line(points, fill=(31, 119, 180), width=2)
    for px, py in points:
        draw.ellipse((px - 2.5, py - 2.5, px + 2.5, py + 2.5), fill=(31, 119, 180))
    return _save(canvas)


def _ticks(low: float, high: float, n: int = 5) -> list[float]:
    """Round values that cover ``low..high`` in about ``n`` steps (1, 2 or 5 times a power of ten)."""
    if high <= low:
        pad = abs(low) * 0.05 or 0.5
        low, high = low - pad, high + pad
    raw = (high - low) / (n - 1)
    power = 10 ** math.floor(math.log10(raw))
    step = next(m * power for m in (1, 2, 5, 10) if m * power >= raw)
    start = math.floor(low / step) * step
    count = math.ceil((high - start) / step - 1e-9)
    return [start + i * step for i in range(count + 1)]


def _save(canvas) -> bytes:
    buf = io.BytesIO()
    canvas.save(buf, format="png", compress_level=1)
    return buf.getvalue()
