"""The deploy stage: the champion served on loopback for one HTTP smoke test, or applied to Kubernetes."""

from __future__ import annotations

import tempfile
from dataclasses import dataclass
from pathlib import Path

from voxelflow.core import audit
from voxelflow.data import ingest
from voxelflow.learn import evaluate
from voxelflow.release import registry
from voxelflow.spec.config import DeploySpec
from voxelflow.stages.context import Context


@dataclass
class Deployment:
    endpoint: str
    model_version: str
    case: str
    dice: float
    latency_s: float
    # True for the local smoke test: its endpoint served one request and stopped with the stage (`voxelflow
    # serve` is what stays up); False for a target that keeps running (kubernetes)
    temporary: bool = False


def deploy_stage(spec: DeploySpec, model_name: str, ctx: Context, case_id: str) -> Deployment:
    """Serve the champion on loopback and segment one held-out case over HTTP (the smoke test).

    ``target: kubernetes`` applies the rendered manifests to the configured cluster instead, and
    fails plainly when no cluster is configured.
    """
    import time

    if spec.target == "kubernetes":
        from voxelflow.serving import k8s_deploy

        applied = k8s_deploy.apply(k8s_deploy.render_for(ctx.pipeline, model_name, spec))
        version = registry.alias_version(ctx.tracking_uri, model_name) or ""
        audit.append(ctx.db, "service.deployed", "voxelflow", model=model_name, version=version,
                     target="kubernetes", objects=applied)
        return Deployment(f"kubernetes:{spec.kubernetes.namespace}/{ctx.pipeline}-inference", version, case_id,
                          float("nan"), 0.0)

    import ssl

    import httpx

    from voxelflow.serving.serve import NIFTI, KeyStore, ModelHolder, Server, create_app, decode_volume, nifti_gz

    keys = KeyStore(ctx.db)
    case = ingest.load_case(ctx.layout.raw, case_id)
    key = keys.create("lifecycle-smoke-test", ["predict"])
    try:  # the temporary key never outlives the smoke test, whatever fails
        with tempfile.TemporaryDirectory(prefix="voxelflow-serve-") as cache:
            holder = ModelHolder(lambda: registry.load_segmenter(ctx.tracking_uri, model_name, Path(cache)))
            holder.reload()
            app = create_app(holder, keys, db=ctx.db)
            with Server(app, ctx.settings.serve_host, 0) as server:
                audit.append(ctx.db, "service.deployed", "voxelflow", model=model_name,
                             version=holder.version, endpoint=server.url, temporary=True,
                             note="smoke test: the endpoint stops when the deploy stage ends")
                start = time.perf_counter()
                # plain HTTP to this process's own server: a TLS context with no CA bundle to load (httpx loads
                # certifi's for each client otherwise, 30-90 ms here), which would refuse any https peer
                resp = httpx.post(f"{server.url}/v1/segment", content=nifti_gz(case["image"], case["affine"]),
                                  headers={"X-API-Key": key, "Content-Type": NIFTI}, timeout=120,
                                  verify=ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT))
                latency = time.perf_counter() - start
    finally:
        keys.revoke(key)
    if resp.status_code != 200:
        raise RuntimeError(f"smoke test failed: HTTP {resp.status_code}: {resp.text[:300]}")
    mask, _, _ = decode_volume(resp.content, resp.headers.get("content-type", ""))
    score = evaluate.dice(mask, case["label"], max(2, int(max(mask.max(), case["label"].max())) + 1))
    return Deployment(server.url, resp.headers["X-Model-Version"], case_id, score, latency, temporary=True)
