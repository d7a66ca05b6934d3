"""Reading volumes from untrusted bytes, with every size known before anything is allocated.

A NIfTI header (NIfTI-1: 348 bytes, NIfTI-2: 540) says the shape and voxel type; the voxel count
and the bytes they need are checked against the caller's limits before the voxels are read, and a
gzip stream is inflated only as far as that header says the file reaches. A gzip bomb, or a header
that claims 30000³ voxels, costs a few kilobytes. Free-text header fields (``descrip``,
``aux_file``, ``intent_name``, ``db_name``) and header extensions are never carried over: callers
get arrays, an affine and the voxel spacing only.
"""

from __future__ import annotations

import io
import struct
import zlib
from dataclasses import dataclass

import numpy as np
from isal import isal_zlib as _gzip  # ISA-L: zlib's API and streams, gzip inflated about 1.5-2 times as fast

_GZIP_ERRORS: tuple[type[Exception], ...] = (zlib.error, _gzip.error)

GZIP_MAGIC = b"\x1f\x8b"
NIFTI1_HEADER, NIFTI2_HEADER = 348, 540
NIFTI_SUFFIXES = (".nii", ".nii.gz")


class VolumeError(ValueError):
    """A volume that cannot be accepted; ``reason`` is a short machine-readable code."""

    def __init__(self, reason: str, detail: str) -> None:
        super().__init__(f"{reason}: {detail}")
        self.reason = reason
        self.detail = detail

    def __reduce__(self):  # pickles (process-based task runners) with its reason and detail
        return (type(self), (self.reason, self.detail))


@dataclass
class Volume:
    array: np.ndarray
    affine: np.ndarray
    spacing: tuple[float, ...]


@dataclass(frozen=True)
class Header:
    """What a NIfTI header declares, read without reading any voxel."""

    version: int  # 1 or 2
    shape: tuple[int, ...]
    dtype: np.dtype
    offset: int  # where the voxels start

    @property
    def voxels(self) -> int:
        return int(np.prod(self.shape, dtype=np.int64)) if self.shape else 0

    @property
    def nbytes(self) -> int:
        """Bytes of the whole file: header, extensions, voxels."""
        return self.offset + self.voxels * self.dtype.itemsize


def _inflate(data: bytes, limit: int) -> bytes:
    """The first ``limit`` bytes a gzip stream inflates to (fewer when it ends); never more in memory."""
    parts: list[bytes] = []
    got, rest = 0, data
    while rest and got < limit:  # a file may hold several gzip members back to back
        d = _gzip.decompressobj(16 + zlib.MAX_WBITS)
        part = d.decompress(rest, limit - got)
        parts.append(part)
        got += len(part)
        if not d.eof:
            break  # the limit was reached, or the stream is truncated
        rest = d.unused_data
    return parts[0] if len(parts) == 1 else b"".join(parts)  # one member, the usual case: no copy


def read_header(prefix: bytes, name: str) -> Header:
    """Parse a NIfTI-1 or NIfTI-2 header from the file's first bytes (uncompressed)."""
    import nibabel as nib

    sizes = {struct.unpack("<i", prefix[:4])[0], struct.unpack(">i", prefix[:4])[0]} if len(prefix) >= 4 else set()
    if not sizes & {NIFTI1_HEADER, NIFTI2_HEADER}:
        raise VolumeError("unreadable", f"{name}: not a NIfTI-1 or NIfTI-2 file")
    if len(prefix) < NIFTI1_HEADER:
        raise VolumeError("truncated", f"{name}: {len(prefix)} bytes, shorter than a NIfTI header")
    if NIFTI1_HEADER in sizes:
        cls = nib.Nifti1Header
    elif NIFTI2_HEADER in sizes:
        if len(prefix) < NIFTI2_HEADER:
            raise VolumeError("truncated", f"{name}: shorter than a NIfTI-2 header")
        cls = nib.Nifti2Header
    else:
        raise VolumeError("unreadable", f"{name}: not a NIfTI-1 or NIfTI-2 file")
    try:
        header = cls.from_fileobj(io.BytesIO(prefix[: cls.sizeof_hdr]), check=True)
        shape = tuple(int(s) for s in header.get_data_shape())
        dtype = header.get_data_dtype()
        offset = int(header.get_data_offset())
    except Exception as exc:  # nibabel raises many kinds on corrupt headers
        raise VolumeError("unreadable", f"{name}: {exc}") from None
    if any(s < 0 for s in shape):
        raise VolumeError("bad-header", f"{name}: negative dimension in {shape}")
    return Header(2 if cls is nib.Nifti2Header else 1, shape, dtype, offset)


def _writable(array: np.ndarray) -> np.ndarray:
    """A C-ordered array the caller owns (arrays read from bytes are read-only views)."""
    array = np.ascontiguousarray(array)
    return array if array.flags.writeable else array.copy()


def volume_shape(header: Header) -> tuple[int, ...]:
    shape = header.shape
    while len(shape) > 3 and shape[-1] == 1:
        shape = shape[:-1]
    return shape


def check_header(header: Header, name: str, max_voxels: int) -> None:
    shape = volume_shape(header)
    if len(shape) != 3:
        raise VolumeError("bad-shape", f"{name}: expected a 3-D volume, got shape {header.shape}")
    if header.voxels > max_voxels:
        raise VolumeError("too-large", f"{name}: the header declares {header.voxels} voxels, over the limit "
                                       f"{max_voxels}")
    if min(shape) < 2:
        raise VolumeError("bad-shape", f"{name}: a dimension is smaller than 2 ({shape})")
    kind = header.dtype.kind
    if kind not in "iuf" or header.dtype.itemsize > 8:
        raise VolumeError("bad-dtype", f"{name}: voxel type {header.dtype} is not a supported numeric type")


def nifti_prefix(data: bytes, name: str) -> bytes:
    """The file's first bytes, uncompressed: enough for a NIfTI-1 or NIfTI-2 header, no more inflated."""
    try:
        return _inflate(data, NIFTI2_HEADER) if data[:2] == GZIP_MAGIC else data[:NIFTI2_HEADER]
    except _GZIP_ERRORS as exc:
        raise VolumeError("unreadable", f"{name}: corrupt gzip stream ({exc})") from None


def read_nifti(data: bytes, name: str, max_voxels: int) -> Volume:
    """Decode a NIfTI-1/NIfTI-2 file (plain or gzip) within ``max_voxels``; raise :class:`VolumeError`."""
    import nibabel as nib

    gz = data[:2] == GZIP_MAGIC
    header = read_header(nifti_prefix(data, name), name)
    check_header(header, name, max_voxels)
    try:
        raw = _inflate(data, header.nbytes) if gz else data[: header.nbytes]
    except _GZIP_ERRORS as exc:
        raise VolumeError("truncated", f"{name}: corrupt gzip stream ({exc})") from None
    if len(raw) < header.nbytes:
        raise VolumeError("truncated", f"{name}: {len(raw)} bytes, the header needs {header.nbytes}")
    cls = nib.Nifti2Image if header.version == 2 else nib.Nifti1Image
    try:
        img = cls.from_bytes(raw)
        shape = volume_shape(header)
        array = np.asanyarray(img.dataobj).reshape(shape)
        affine = np.asarray(img.affine, dtype=np.float64)
        spacing = tuple(float(s) for s in img.header.get_zooms()[:3])
    except Exception as exc:  # noqa: BLE001 - anything nibabel cannot decode is the file's problem
        raise VolumeError("unreadable", f"{name}: {exc}") from None
    if np.issubdtype(array.dtype, np.floating) and not np.isfinite(array).all():
        raise VolumeError("non-finite", f"{name}: contains NaN or infinite values")
    if not np.isfinite(affine).all() or abs(np.linalg.det(affine[:3, :3])) < 1e-9:
        raise VolumeError("bad-affine", f"{name}: affine is singular or not finite")
    return Volume(array=_writable(array), affine=affine, spacing=spacing)


def npy_header(data: bytes, name: str) -> tuple[Header, bool]:
    """What a ``.npy`` header declares (trailing single axes dropped) and whether it is Fortran-ordered."""
    from numpy.lib import format as npformat

    fh = io.BytesIO(data)
    try:
        version = npformat.read_magic(fh)
        reader = npformat.read_array_header_1_0 if version == (1, 0) else npformat.read_array_header_2_0
        shape, fortran, dtype = reader(fh, max_header_size=10000)
    except Exception as exc:  # noqa: BLE001 - not a .npy file
        raise VolumeError("unreadable", f"{name}: {exc}") from None
    shape = tuple(int(s) for s in shape)
    while len(shape) > 3 and shape[-1] == 1:
        shape = shape[:-1]
    if np.dtype(dtype).hasobject:  # pickled objects: never unpickled
        raise VolumeError("unreadable", f"{name}: holds Python objects, not voxels")
    return Header(0, shape, np.dtype(dtype), fh.tell()), bool(fortran)


def read_npy(data: bytes, name: str, max_voxels: int) -> np.ndarray:
    """A ``.npy`` array, its header checked (3-D, numeric, within ``max_voxels``) before any voxel is read."""
    header, fortran = npy_header(data, name)
    shape, dtype = header.shape, header.dtype
    check_header(header, name, max_voxels)
    if len(data) < header.nbytes:
        raise VolumeError("truncated", f"{name}: {len(data)} bytes, the header needs {header.nbytes}")
    array = np.frombuffer(data, dtype=dtype, count=header.voxels, offset=header.offset)
    array = array.reshape(shape, order="F" if fortran else "C")
    if np.issubdtype(array.dtype, np.floating) and not np.isfinite(array).all():
        raise VolumeError("non-finite", f"{name}: contains NaN or infinite values")
    return _writable(array)


FREE_TEXT = ("descrip", "aux_file", "intent_name", "db_name")  # NIfTI header fields people write names into


def scrub_nifti(data: bytes, name: str, limit: int) -> bytes | None:
    """A copy of a NIfTI file fit to keep: its free-text fields blanked and its header extensions (which
    may hold a whole DICOM header) dropped, the voxel bytes as they were, gzip when it came as gzip.

    None when that cannot be made safely: the header does not parse, or the file would inflate beyond
    ``limit`` bytes. The caller then keeps nothing and the file stays where it arrived.
    """
    import nibabel as nib

    try:
        header = read_header(nifti_prefix(data, name), name)
    except VolumeError:
        return None
    if header.nbytes > limit:
        return None
    gz = data[:2] == GZIP_MAGIC
    try:
        raw = _inflate(data, header.nbytes) if gz else data[: header.nbytes]
    except _GZIP_ERRORS:
        return None
    cls = nib.Nifti2Header if header.version == 2 else nib.Nifti1Header
    hdr = cls.from_fileobj(io.BytesIO(raw[: cls.sizeof_hdr]))  # parsed above: the same bytes
    for field in FREE_TEXT:
        if field in hdr:
            hdr[field] = b""
    start = cls.sizeof_hdr + 4  # no extensions: the voxels follow the header and its 4 extension bytes
    hdr.set_data_offset(start)
    out = hdr.binaryblock + b"\0" * 4 + raw[header.offset:]
    if not gz:
        return out
    import gzip

    return gzip.compress(out, compresslevel=1, mtime=0)
