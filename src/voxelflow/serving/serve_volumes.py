"""Volumes in and masks out of the inference service: formats, header checks, the memory one inference needs."""

from __future__ import annotations

import gzip
import io
import math
from typing import Any

import numpy as np

from voxelflow.data.formats import VolumeError

NPY = "application/x-npy"
NIFTI = "application/gzip"  # NIfTI, gzip-compressed (level 1 in answers)
NIFTI_PLAIN = "application/x-nifti"  # NIfTI, uncompressed
#: what /v1/segment accepts (or no Content-Type at all: the format is known from the body's first bytes)
BODY_TYPES = (NPY, NIFTI, "application/x-gzip", "application/octet-stream", NIFTI_PLAIN)
#: the mask formats an answer comes in, by the media type a request's ``Accept`` names (``application/octet-stream``:
#: the input's own, as with no ``Accept``); ``encode_mask`` takes the format
ANSWER_TYPES = {NPY: "npy", NIFTI_PLAIN: "nii", NIFTI: "nifti", "application/x-gzip": "nifti"}
#: the Content-Type of each answer format
ANSWER_MEDIA = {"npy": NPY, "nii": NIFTI_PLAIN, "nifti": NIFTI}
#: enough of a body for a .npy header (numpy's limit: 10 000 bytes and the magic) or a NIfTI-2 header
HEAD_BYTES = 16384

Body = bytes | bytearray | memoryview


def _is_npy(body: Body, content_type: str) -> bool:
    return content_type.startswith(NPY) or bytes(body[:6]) == b"\x93NUMPY"


def _head(body: Body) -> Body:
    """The body's first bytes, enough for any header; the whole body when gzip (a header's worth is inflated)."""
    return body if bytes(body[:2]) == b"\x1f\x8b" else bytes(memoryview(body)[:HEAD_BYTES])


def decode_volume(
    body: Body, content_type: str, max_voxels: int = 512**3
) -> tuple[np.ndarray, np.ndarray | None, str]:
    """The request body as (volume, affine or None, the input's format: ``npy`` or ``nifti``).

    The header (NIfTI-1/2 or .npy) is checked first: shape, voxel type and voxel count; nothing is
    inflated or allocated beyond what it declares (:mod:`voxelflow.data.formats`). A ``.npy`` body in a
    ``bytearray`` (as the service reads it) becomes the volume without a copy. Raises
    :class:`~voxelflow.data.formats.VolumeError`.
    """
    from voxelflow.data.formats import read_nifti

    if _is_npy(body, content_type):
        return _npy_volume(body, max_voxels), None, "npy"
    vol = read_nifti(body if isinstance(body, bytes) or bytes(body[:2]) == b"\x1f\x8b" else memoryview(body),
                     "body", max_voxels)
    return vol.array, vol.affine, "nifti"


def _npy_volume(body: Body, max_voxels: int) -> np.ndarray:
    """A ``.npy`` body's array, its header checked first (as :func:`voxelflow.data.formats.read_npy`); a view of
    a writable, C-ordered body, a copy otherwise."""
    from voxelflow.data.formats import check_header, npy_header

    header, fortran = npy_header(_head(body), "body")
    check_header(header, "body", max_voxels)
    if len(body) < header.nbytes:
        raise VolumeError("truncated", f"body: {len(body)} bytes, the header needs {header.nbytes}")
    array = np.frombuffer(body, dtype=header.dtype, count=header.voxels, offset=header.offset)
    array = array.reshape(header.shape, order="F" if fortran else "C")
    if np.issubdtype(array.dtype, np.floating) and not np.isfinite(array).all():
        raise VolumeError("non-finite", "body: contains NaN or infinite values")
    array = np.ascontiguousarray(array)
    return array if array.flags.writeable else array.copy()


def answer_format(accept: str, given: str, summary: bool = False) -> str | None:
    """The answer's format for a request's ``Accept`` header: ``npy``, ``nii``, ``nifti`` (gzip) or, with
    ``summary``, ``json``; None when the header accepts none of them (406).

    No header, ``*/*`` or ``application/octet-stream``: the input's own format (``given``: ``npy`` or ``nifti``),
    as before content negotiation. Otherwise the acceptable format with the highest ``q`` (a media type's own
    ``q`` over a wildcard's, RFC 9110); among equals, the input's own, then ``npy``, ``nii``, ``nifti``.
    """
    offered = ["json"] if summary else list(dict.fromkeys([given, "npy", "nii", "nifti"]))
    if not accept.strip():
        return offered[0]
    best: dict[str, tuple[int, float]] = {}  # format -> (how specific the matching range was, its q)
    for item in accept.split(","):
        media, *params = (p.strip() for p in item.split(";"))
        media, q = media.lower(), 1.0
        for param in params:
            name, _, value = param.partition("=")
            if name.strip().lower() == "q":
                try:
                    q = min(1.0, max(0.0, float(value)))
                except ValueError:
                    q = 0.0
        for fmt in offered:
            types = ("application/json",) if fmt == "json" else tuple(m for m, f in ANSWER_TYPES.items() if f == fmt)
            if media in types:
                rank = 3
            elif media == "application/octet-stream" and fmt == given and not summary:
                rank = 2
            elif media == "application/*":
                rank = 1
            elif media == "*/*":
                rank = 0
            else:
                continue
            if rank > best.get(fmt, (-1, 0.0))[0]:
                best[fmt] = (rank, q)
    choices = [f for f in offered if best.get(f, (0, 0.0))[1] > 0]
    return max(choices, key=lambda f: best[f][1]) if choices else None  # max keeps the first among equals


def declared_volume(body: Body, content_type: str) -> tuple[tuple[int, ...], np.dtype, tuple[float, ...]]:
    """Shape, voxel type and spacing (mm) a body declares, from its header alone.

    At most a NIfTI-2 header's worth of gzip is inflated; no voxel is read or copied. Raises
    :class:`~voxelflow.data.formats.VolumeError` when there is no readable header.
    """
    import nibabel as nib

    from voxelflow.data.formats import nifti_prefix, npy_header, read_header, volume_shape

    body = _head(body)
    if _is_npy(body, content_type):
        header, _ = npy_header(body, "body")
        return header.shape, header.dtype, (1.0, 1.0, 1.0)
    prefix = nifti_prefix(body, "body")
    header = read_header(prefix, "body")
    cls = nib.Nifti2Header if header.version == 2 else nib.Nifti1Header
    try:  # the spacing resampling will use: the affine's (sform, else qform), not pixdim, which it may contradict
        affine = cls.from_fileobj(io.BytesIO(prefix[: cls.sizeof_hdr])).get_best_affine()
    except Exception as exc:  # noqa: BLE001 - nibabel raises many kinds on corrupt headers
        raise VolumeError("unreadable", f"body: {exc}") from None
    spacing = tuple(float(s) for s in np.sqrt((np.asarray(affine, dtype=np.float64)[:3, :3] ** 2).sum(0)))
    return volume_shape(header), header.dtype, spacing


def model_grid_voxels(shape: tuple[int, ...], spacing: tuple[float, ...], config: dict[str, Any] | None) -> float:
    """Voxels of the model's grid for a volume of ``shape`` and ``spacing``: resampled to the model's spacing
    (its ``Spacingd``), at least one window."""
    config = config or {}
    voxels = math.prod(int(s) for s in shape)
    pixdim = next((list(t["Spacingd"]["pixdim"]) for t in config.get("transforms", [])
                   if isinstance(t, dict) and "Spacingd" in t), None)
    zoom = 1.0
    if pixdim:
        pixdim = (pixdim * 3)[:3] if len(pixdim) == 1 else pixdim
        zoom = math.prod(max(float(s), 1e-6) / max(float(p), 1e-6) for s, p in zip(spacing[:3], pixdim[:3]))
    return max(voxels * zoom, math.prod(config.get("spatial_size", [1])))


def _network(config: dict[str, Any]) -> dict[str, Any]:
    network = next(iter(config.get("network", {}).values()), {}) if isinstance(config.get("network"), dict) else {}
    return network if isinstance(network, dict) else {}


def _channels(config: dict[str, Any]) -> int:
    return int(_network(config).get("out_channels", 2))


def working_set_bytes(shape: tuple[int, ...], dtype: np.dtype, spacing: tuple[float, ...],
                      config: dict[str, Any] | None) -> int:
    """Memory one inference of this volume needs, from its header: per input voxel, the body (read, joined,
    decoded), about 80 bytes of float intermediates (its float copy, resampling grids there and back, the
    masks; measured on CPU at 96^3) and the logits of every channel inverted onto it; per voxel of the model's grid
    (resampled to its spacing, padded to its window), the preprocessed copies and the sliding-window logits,
    accumulator and count map of every output channel."""
    config = config or {}
    voxels = math.prod(int(s) for s in shape)
    grid = model_grid_voxels(shape, spacing, config)
    channels = _channels(config)
    per_input = 3 * np.dtype(dtype).itemsize + 80 + 8 * channels  # + the logits inverted onto the input grid
    per_grid = 4 * 2 + 4 * (2 * channels + 1) + 1  # preprocessed (two copies), logits + accumulator + count, argmax
    total = voxels * per_input + grid * per_grid
    return int(total) if math.isfinite(total) else 2**63  # an absurd spacing: more than any budget


#: device memory cuDNN's convolution workspaces and the allocator's rounding may take beside the tensors
DEVICE_OVERHEAD = 256 * 2**20
#: float32 maps of the network's first-level width one window holds at once under no_grad (a block's input,
#: output and normalised copy, the skip it keeps, the decoder's concatenation; the coarser levels add less)
ACTIVATION_MAPS = 10


def _window_bytes(config: dict[str, Any]) -> int:
    """Device memory of the windows of one sliding-window step: ``sw_batch_size`` windows, their importance map,
    the network's activations and its output (weighted, and a copy on the way to the stitched output)."""
    window = config.get("sliding_window") or {"roi_size": config.get("spatial_size", [1])}
    roi = math.prod(int(r) for r in window.get("roi_size") or [1])
    batch = int(window.get("sw_batch_size", 4))
    network = _network(config)
    width = next((int(network[k][0]) for k in ("channels", "features", "filters") if network.get(k)),
                 int(network.get("init_filters", 32)))
    inputs, outputs = int(network.get("in_channels", 1)), _channels(config)
    return batch * roi * 4 * (inputs + ACTIVATION_MAPS * width + 3 * outputs) + roi * 4 + DEVICE_OVERHEAD


def _stitched_bytes_per_voxel(config: dict[str, Any]) -> int:
    """Per voxel of the model's grid, what stitching on the device holds there: the input (and its padded copy),
    the logits of every channel and the count map."""
    return 4 * (2 * int(_network(config).get("in_channels", 1)) + _channels(config) + 1)


def device_working_set_bytes(grid_voxels: float, config: dict[str, Any] | None, stitched: bool) -> int:
    """Device memory one inference needs on a model grid of ``grid_voxels``: the windows of one step
    (:func:`_window_bytes`) and, when the output is ``stitched`` on the device, the input and the logits there
    (otherwise they stay in host memory, which :func:`working_set_bytes` counts)."""
    config = config or {}
    total = _window_bytes(config) + (grid_voxels * _stitched_bytes_per_voxel(config) if stitched else 0)
    return int(total) if math.isfinite(total) else 2**63


def stitch_limit_voxels(share_bytes: int, config: dict[str, Any] | None) -> int:
    """The largest model grid (voxels) whose sliding-window output is stitched on the device within
    ``share_bytes``; larger grids are stitched on the CPU (0: every one is)."""
    config = config or {}
    return max(0, int(share_bytes - _window_bytes(config)) // _stitched_bytes_per_voxel(config))


#: how each kind of bad volume is answered
VOLUME_STATUS = {"too-large": 413, "bad-shape": 422, "bad-dtype": 422, "non-finite": 422, "bad-affine": 422}


def encode_mask(mask: np.ndarray, affine: np.ndarray | None, fmt: str) -> tuple[bytes, str]:
    """The mask as ``fmt`` (``npy``, ``nii``: NIfTI-1, ``nifti``: NIfTI-1 gzip-compressed at level 1) and its
    media type."""
    if fmt == "npy":
        buf = io.BytesIO()
        np.save(buf, mask, allow_pickle=False)
        return buf.getvalue(), NPY
    if fmt == "nii":
        return nifti_bytes(mask.astype(np.uint8, copy=False), affine), NIFTI_PLAIN
    return nifti_gz(mask.astype(np.uint8, copy=False), affine), NIFTI


def nifti_bytes(array: np.ndarray, affine: np.ndarray | None) -> bytes:
    import nibabel as nib

    return nib.Nifti1Image(array, affine if affine is not None else np.eye(4)).to_bytes()


def nifti_gz(array: np.ndarray, affine: np.ndarray | None) -> bytes:
    return gzip.compress(nifti_bytes(array, affine), compresslevel=1)
