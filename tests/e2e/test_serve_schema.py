"""Schemathesis against the inference service's own OpenAPI document, on loopback: no 5xx, every answer documented.

The real service (uvicorn on 127.0.0.1, a tiny untrained UNet, keys in SQLite) is fuzzed over every documented
operation with Schemathesis' checks (all but one, see NOT_APPLICABLE): valid requests with a key that holds every
role the routes need, invalid ones (negative mode) with that key, and valid ones with whatever key Schemathesis
makes up. Generation is derandomized, so a run is repeatable; VOXELFLOW_SCHEMA_EXAMPLES=1500 digs deeper (about
five minutes here). Request bodies of ``/v1/segment`` are volumes built to be nearly right: ``.npy`` and NIfTI-1/2 files with
random shapes, voxel types, spacings, affines, offsets, scalings and lengths, gzipped or not, truncated or not,
so that the checks reach the header parser, the memory budget, the decoder and the model rather than stopping
at "not a volume".
"""

from __future__ import annotations

import copy
import gzip
import io
import os
from collections import Counter

import numpy as np
import pytest
import schemathesis
import yaml
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from schemathesis import GenerationMode
from schemathesis.specs.openapi.checks import positive_data_acceptance

from voxelflow.serving.serve import BODY_TYPES, NIFTI, NPY

#: examples per operation and generation mode; /v1/segment with valid requests, where the volumes are read, gets
#: twice as many
EXAMPLES = int(os.environ.get("VOXELFLOW_SCHEMA_EXAMPLES", "30"))

# ---------------------------------------------------------------- bodies that are nearly volumes

#: voxel types a volume may have, and some it may not
GOOD_DTYPES = ["<f4", ">f8", "|u1", "|i1", "<i2", ">u2", "<i4", "<u4", "<i8", "<u8"]
BAD_DTYPES = ["|b1", "<c8", "<U2", "|S3", "<M8[s]", "|V4", "|O", "<f2", ">f16"]
#: values a header field or a voxel should not have, mixed with ones it may
NON_FINITE = [float("nan"), float("inf"), -float("inf")]
ODD = [0.0, 1.0, -1.0, 0.5, 1.5, 1e-30, -1e-30, 1e6, 1e30, -1e30, 3e38] + NON_FINITE
#: what an odd float field gets: non-finite values half of the time
odd_floats = st.one_of(st.sampled_from(NON_FINITE), st.sampled_from(ODD))
ODD_INTS = [0, 1, 2, -1, 7, 8, 255, 32767, -32768, 2**31 - 1, -(2**31)]


@st.composite
def volumes(draw, dtypes: list[str]) -> np.ndarray:
    """A valid volume: 3-D, 2..16 voxels a side, a numeric type, finite values (now and then extreme)."""
    shape = tuple(draw(st.lists(st.integers(2, 16), min_size=3, max_size=3)))
    rng = np.random.default_rng(draw(st.integers(0, 2**32 - 1)))
    scale = draw(st.sampled_from([1.0, 1.0, 1e-30, 6e4, 1e30]))
    with np.errstate(all="ignore"):
        return (rng.random(shape) * scale).astype(draw(st.sampled_from(dtypes)))


@st.composite
def npy_bodies(draw) -> bytes:
    """A valid ``.npy`` volume, then none, one or two of: another shape, voxel type or order in the header, voxels
    made NaN or infinite, a cut or a few flipped bytes."""
    volume = draw(volumes(GOOD_DTYPES + ["<f2"]))
    header = {"descr": volume.dtype.str, "fortran_order": False, "shape": volume.shape}
    data = volume.tobytes()
    changes = st.lists(st.sampled_from(["shape", "dtype", "order", "values", "cut", "flip"]), max_size=2,
                       min_size=draw(st.sampled_from([1, 1, 1, 0])))  # a quarter of them left valid
    for change in draw(changes):
        if change == "shape":
            header["shape"] = tuple(draw(st.lists(st.sampled_from([0, 1, 2, 3, 16, 64, 30000, 2**40]), max_size=5)))
        elif change == "dtype":
            header["descr"] = draw(st.sampled_from(GOOD_DTYPES + BAD_DTYPES))
        elif change == "order":
            header["fortran_order"] = True
        elif change == "values" and volume.dtype.kind == "f":
            spoiled = volume.copy()
            spoiled.flat[draw(st.integers(0, spoiled.size - 1))] = draw(odd_floats)
            data = spoiled.tobytes()
        elif change == "cut":
            data = data[: draw(st.integers(0, len(data)))]
        elif change == "flip":
            data = flip(draw, data)
    buf = io.BytesIO()
    writer = draw(st.sampled_from([np.lib.format.write_array_header_1_0, np.lib.format.write_array_header_2_0]))
    try:
        writer(buf, header)
    except (TypeError, ValueError):  # a dtype the writer cannot spell: write the plain one
        writer(buf, {**header, "descr": volume.dtype.str})
    return buf.getvalue() + data


def nifti_field(draw, hdr, field: str) -> None:
    """Set one NIfTI header field to an odd value."""
    if field == "pixdim":
        hdr["pixdim"][draw(st.sampled_from([1, 2, 3, 0, 4]))] = draw(odd_floats)
    elif field == "sform":
        hdr[draw(st.sampled_from(["srow_x", "srow_y", "srow_z"]))][draw(st.integers(0, 3))] = draw(odd_floats)
    elif field == "sform_code":
        hdr["sform_code"] = draw(st.sampled_from([0, 1, 2, 3, 4, 5, 77]))
    elif field == "qform":
        hdr["qform_code"] = draw(st.sampled_from([0, 1, 2, 77]))
        hdr[draw(st.sampled_from(["quatern_b", "quatern_c", "quatern_d", "qoffset_x"]))] = draw(odd_floats)
    elif field == "scaling":
        hdr[draw(st.sampled_from(["scl_slope", "scl_inter"]))] = draw(odd_floats)
    elif field == "offset":
        hdr["vox_offset"] = draw(st.sampled_from([0, 1, 100, 348, 352, 540, 544, 4096, 2**31 - 1, -1]))
    elif field == "datatype":
        hdr["datatype"] = draw(st.sampled_from([0, 1, 2, 4, 8, 16, 32, 64, 128, 256, 512, 768, 1024, 1280, 1536,
                                                1792, 2048, 2304, 9999, -4]))
    elif field == "dim":
        index = draw(st.integers(0, 7))
        hdr["dim"][index] = draw(st.sampled_from(ODD_INTS if hdr.sizeof_hdr == 348 else ODD_INTS + [2**40]))
    elif field == "bitpix":
        hdr["bitpix"] = draw(st.sampled_from(ODD_INTS))
    elif field == "sizeof_hdr":
        hdr["sizeof_hdr"] = draw(st.sampled_from([0, 348, 540, 1000]))


@st.composite
def nifti_bodies(draw, gz: bool | None = None) -> bytes:
    """A valid NIfTI-1 or NIfTI-2 volume, then none, one, two or three odd header fields (spacing, sform, qform,
    scaling, offset, voxel type, dimensions), now and then a cut or a few flipped bytes; gzipped or not."""
    import nibabel as nib

    image_cls = draw(st.sampled_from([nib.Nifti1Image, nib.Nifti2Image]))
    affine = np.diag([draw(st.sampled_from([0.5, 1.0, 1.5, 3.0, -2.0])) for _ in range(3)] + [1.0])
    affine[:3, 3] = draw(st.lists(st.floats(-200, 200), min_size=3, max_size=3))
    volume = draw(volumes(GOOD_DTYPES))
    raw = image_cls(volume, affine, dtype=volume.dtype).to_bytes()
    hdr = image_cls.header_class.from_fileobj(io.BytesIO(raw))
    fields = draw(st.lists(st.sampled_from(["pixdim", "sform", "sform_code", "qform", "scaling", "offset",
                                            "datatype", "dim", "bitpix", "sizeof_hdr"]), max_size=3,
                          min_size=draw(st.sampled_from([1, 1, 1, 0]))))  # a quarter of them left valid
    with np.errstate(all="ignore"):
        for field in fields:
            try:
                nifti_field(draw, hdr, field)
            except OverflowError:  # wider than the field (an int16 in NIfTI-1): leave it as it was
                continue
    body = hdr.binaryblock + raw[hdr.sizeof_hdr:]
    end = draw(st.integers(0, 9))
    if end == 0:
        body = body[: draw(st.integers(0, len(body)))]
    elif end == 1:
        body = flip(draw, body)
    if gz if gz is not None else draw(st.booleans()):
        body = gzip.compress(body, compresslevel=1)
    return body


def flip(draw, data: bytes) -> bytes:
    """A few bytes changed, most likely in the header."""
    if not data:
        return data
    out = bytearray(data)
    for _ in range(draw(st.integers(1, 8))):
        out[draw(st.integers(0, min(len(out), 600) - 1))] = draw(st.integers(0, 255))
    return bytes(out)


schemathesis.openapi.media_type(NPY, npy_bodies())
schemathesis.openapi.media_type(NIFTI, nifti_bodies(gz=True), aliases=["application/x-gzip"])
schemathesis.openapi.media_type("application/x-nifti", nifti_bodies(gz=False))
schemathesis.openapi.media_type("application/octet-stream", st.one_of(npy_bodies(), nifti_bodies(), st.binary()))
assert set(BODY_TYPES) == {NPY, NIFTI, "application/x-gzip", "application/x-nifti", "application/octet-stream"}

# ---------------------------------------------------------------- the service


def tiny_segmenter():
    """An untrained tiny UNet on the demo spec's transforms at 16^3, as tests/unit/conftest.py makes it."""
    import torch

    from tests.conftest import REPO
    from voxelflow.learn.model import Segmenter
    from voxelflow.learn.train import build_network, state_dict_bytes
    from voxelflow.spec.config import validate_spec

    network = {"UNet": {"spatial_dims": 3, "in_channels": 1, "out_channels": 2, "channels": [4, 8], "strides": [2],
                        "num_res_units": 0}}
    data = yaml.safe_load((REPO / "deployments" / "specs" / "demo.yaml").read_text())
    for item in data["preprocess"]["transforms"]:
        for kwargs in item.values():
            if "spatial_size" in kwargs:
                kwargs["spatial_size"] = [16, 16, 16]
    data["train"]["network"] = copy.deepcopy(network)
    data["train"]["precision"] = "fp32"
    pre = validate_spec(data, "tiny").preprocess
    config = {"network": network, "transforms": copy.deepcopy(pre.transforms), "spatial_size": list(pre.spatial_size),
              "sliding_window": {"roi_size": list(pre.spatial_size), "overlap": 0.25, "sw_batch_size": 4,
                                 "mode": "constant"},
              "precision": "fp32"}
    torch.manual_seed(0)
    return Segmenter(config, state_dict_bytes(build_network(copy.deepcopy(network))), device="cpu")


@pytest.fixture(scope="module")
def service(tmp_path_factory):
    """The service on 127.0.0.1 with its OpenAPI document on, and a key with every role the routes need."""
    from voxelflow.core.db import Database
    from voxelflow.serving.serve import KeyStore, ModelHolder, Server, create_app

    segmenter = tiny_segmenter()
    db = Database(f"sqlite:///{tmp_path_factory.mktemp('schema') / 'voxelflow.db'}")
    keys = KeyStore(db)
    key = keys.create("schemathesis", ["predictor", "viewer", "operator"])
    holder = ModelHolder(lambda: (segmenter, "1"))
    holder.reload()
    # throttles opened wide: Schemathesis sends hundreds of requests a second from one address
    app = create_app(holder, keys, db=db, docs=True, rate=1e6, burst=10**6, failed_rate=1e6, failed_burst=10**6,
                     max_bytes=8 * 1024**2, max_voxels=64**3, memory_budget=512 * 1024**2, workers=2, queue=8,
                     timeout_s=60)
    with Server(app) as server:
        yield server.url, key
    db.dispose()


#: a binary body that matches its schema ("type: string, format: binary") is not therefore a volume, so 400, 413
#: and 422 are right for many schema-valid requests: the check that every one of them is accepted does not apply
NOT_APPLICABLE = [positive_data_acceptance]


def fuzz(url: str, cases, examples: int) -> Counter:
    """Send each generated case and run Schemathesis' checks on the answer; the statuses seen."""
    statuses: Counter = Counter()

    @given(case=cases)
    @settings(max_examples=examples, deadline=None, database=None, derandomize=True,
              suppress_health_check=list(HealthCheck))
    def send(case):
        response = case.call_and_validate(base_url=url, timeout=60, excluded_checks=NOT_APPLICABLE)
        statuses[response.status_code] += 1
        assert response.status_code < 500, (response.status_code, response.text[:300])

    send()
    return statuses


@pytest.mark.parametrize(("with_key", "mode"), [(True, GenerationMode.POSITIVE), (True, GenerationMode.NEGATIVE),
                                              (False, GenerationMode.POSITIVE)],
                         ids=["key-valid-requests", "key-invalid-requests", "made-up-keys"])
def test_every_operation_answers_as_documented_and_never_5xx(service, mode, with_key):
    """Every documented operation, fuzzed: no 5xx, and each status, content type, header and body as documented.

    Invalid requests (negative mode) are made for the operations that take a query or a body; a header that may be
    any string cannot be made invalid.
    """
    url, key = service
    api = schemathesis.openapi.from_url(f"{url}/openapi.json")
    operations = [result.ok() for result in api.get_all_operations()]
    assert {f"{op.method.upper()} {op.path}" for op in operations} >= {
        "GET /health/live", "GET /health/ready", "GET /metrics", "GET /v1/model", "POST /v1/segment",
        "POST /v1/reload"}
    seen: dict[str, Counter] = {}
    for op in operations:
        if mode is GenerationMode.NEGATIVE and not (len(op.query) or op.body):
            continue
        headers = {"x-api-key": key} if with_key and any(p.name.lower() == "x-api-key" for p in op.headers) else None
        volumes_read = op.path == "/v1/segment" and with_key and mode is GenerationMode.POSITIVE
        examples = 2 * EXAMPLES if volumes_read else EXAMPLES
        seen[f"{op.method.upper()} {op.path}"] = fuzz(url, op.as_strategy(mode, headers=headers), examples)
    print(mode.value, with_key, {name: dict(counts) for name, counts in seen.items()})
    assert all(seen.values()), seen
    if with_key and mode is GenerationMode.POSITIVE:  # the fuzzing reached the model, not only the refusals
        assert seen["POST /v1/segment"][200] > 0 and seen["GET /v1/model"][200] > 0, seen
