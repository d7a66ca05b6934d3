"""Where voxelflow keeps things and which services it talks to: :class:`Settings`, the ``VOXELFLOW_*`` variables.

Every layer reads them; secrets and endpoints live here, never in the spec.
"""

from __future__ import annotations

from pathlib import Path

from pydantic import Field, SecretStr
from pydantic_settings import BaseSettings, SettingsConfigDict


class Settings(BaseSettings):
    """Where voxelflow keeps things and which services it talks to (``VOXELFLOW_*``).

    Two addresses decide where a lifecycle's state lives: ``store`` (bytes, any fsspec URL) and
    ``database_url`` (shared state, any SQLAlchemy URL). Both default to the home folder.
    """

    model_config = SettingsConfigDict(env_prefix="VOXELFLOW_", extra="ignore")

    home: Path = Field(Path(".voxelflow"), description="local defaults: store, database, MLflow, caches")
    store: str | None = Field(None, description="fsspec URL for every byte the pipeline writes (default: home)")
    database_url: SecretStr | None = Field(
        None, description="SQLAlchemy URL for ledger, audit log, API keys, cursors, locks (default: SQLite in home); "
        "a secret: it may carry a password"
    )
    mlflow_tracking_uri: SecretStr | None = Field(
        None, description="default: SQLite inside home; a secret: it may carry a password")
    mlflow_artifact_root: str | None = Field(
        None, description="default: mlartifacts in home, or a prefix under the store when the store is not local"
    )
    dask_scheduler: str | None = Field(None, description="default: none, a local cluster is started")
    dask_workers: int | None = Field(None, ge=1, description="workers of the local cluster (default: cores)")
    serve_host: str = "127.0.0.1"
    serve_port: int = Field(8000, ge=0, le=65535)
    deid_key: SecretStr | None = Field(
        None, description="key of the consistent DICOM UID remapping; required to ingest DICOM, never stored"
    )
    deid_key_block: str = Field(
        "voxelflow-deid-key", description="Prefect Secret block flow runs read the key from when deid_key is unset")
    serve_workers: int | None = Field(
        None, ge=1, description="inferences at once (default: one per core, or per GPU slot on GPUs)")
    serve_per_gpu: int = Field(1, ge=1, le=2, description="inferences each GPU runs at once (1 or 2); each "
                               "visible GPU holds one replica of the model")
    serve_queue: int | None = Field(None, ge=0, description="requests that may wait for a worker (default: workers)")
    serve_timeout_s: float = Field(120.0, gt=0, description="longest a request may take (then 504)")
    serve_max_voxels: int = Field(512**3, gt=0, description="largest volume accepted (then 413)")
    serve_memory_budget_mb: int = Field(
        8192, gt=0, description="memory one inference may need, estimated from the header with the model's working "
        "set (then 413)")
    serve_docs: bool = Field(False, description="serve /docs and /openapi.json")
    serve_tls_cert: str | None = Field(None, description="PEM certificate: HTTPS when set with serve_tls_key")
    serve_tls_key: str | None = Field(None, description="PEM private key of serve_tls_cert")
    serve_trusted_proxies: str = Field(
        "", description="comma-separated CIDRs of proxies whose X-Forwarded-For names the client (default: none)")
    allowed_imports: str = Field(
        "monai,torch,voxelflow", description="comma-separated top-level packages a spec's import paths may name "
        "(networks, losses, transforms, metrics); add your own package, e.g. monai,torch,voxelflow,mypackage")
    webhook_url: SecretStr | None = Field(
        None, description="where the notify_webhook step POSTs its JSON summary; a secret: it may carry a token")
    dicom_callers: str = Field(
        "", description="who may send to `voxelflow receive`: comma-separated AE_TITLE or AE_TITLE@host (that AE "
        "title only from that host); empty: no one")
    dicom_tls_cert: str | None = Field(None, description="PEM certificate: `voxelflow receive` speaks TLS when set "
                                       "with dicom_tls_key")
    dicom_tls_key: str | None = Field(None, description="PEM private key of dicom_tls_cert")
    dicom_tls_ca: str | None = Field(None, description="PEM CA bundle: callers must present a certificate it signed")
    dicom_max_pdu: int = Field(262144, ge=4096, lt=2**32, description="largest PDU a caller may send, in bytes "
                               "(negotiated; a bigger one aborts the association)")
    dicom_max_instances: int = Field(10000, ge=1, description="instances one association may send (then aborted)")
    dicom_max_bytes: int = Field(4 << 30, ge=1, description="bytes one association may send (then aborted)")
    dicom_max_associations: int = Field(4, ge=1, description="associations open at once (more are rejected)")
    spool_max_bytes: int = Field(20 << 30, ge=1, description="bytes the DICOM spool may hold, instances in transit "
                                 "included (an association that would go over is aborted)")
    spool_retention_h: float = Field(
        0.0, ge=0, description="hours a received series stays in the spool once it is done (its results "
        "acknowledged by the destination, or it was ingested or skipped); 0: deleted at once. A series whose results "
        "the destination has not acknowledged stays")
    dicom_ae_title: str = Field(
        "VOXELFLOW", min_length=1, max_length=16, description="voxelflow's own DICOM AE title: the calling AE "
        "title of the results it sends (C-STORE)")
    dicom_destination: str | None = Field(
        None, description="where triggered predictions send their DICOM results: dicom://AE_TITLE@host:port "
        "(C-STORE) or dicomweb+http(s)://host/path (STOW-RS); no credentials in it (they are dicomweb_*)")
    dicom_send_tls_cert: str | None = Field(
        None, description="PEM certificate voxelflow presents when sending over DICOM (TLS with dicom_send_tls_key)")
    dicom_send_tls_key: str | None = Field(None, description="PEM private key of dicom_send_tls_cert")
    dicom_send_tls_ca: str | None = Field(
        None, description="PEM CA bundle a DICOM destination's certificate is checked against: sends over TLS when set")
    dicom_send_attempts: int = Field(
        3, ge=1, description="attempts at sending one object while the destination's errors are transient")
    dicom_send_backoff_s: float = Field(
        1.0, ge=0, description="seconds before the second attempt of a send, doubling for each later one")
    dicom_send_timeout_s: float = Field(30.0, gt=0, description="longest wait for a DICOM or DICOMweb peer's answer")
    dicomweb_username: str | None = Field(None, description="user of HTTP basic authentication at DICOMweb servers")
    dicomweb_password: SecretStr | None = Field(None, description="password of dicomweb_username")
    dicomweb_token: SecretStr | None = Field(
        None, description="bearer token for DICOMweb servers (instead of dicomweb_username and dicomweb_password)")
    dicomweb_ca: str | None = Field(None, description="PEM CA bundle HTTPS DICOMweb servers are checked against "
                                    "(default: the system's)")

    @property
    def root(self) -> Path:
        return self.home.expanduser().resolve()

    @property
    def store_url(self) -> str:
        return self.expand(self.store) if self.store else str(self.root)

    @property
    def database(self) -> str:
        """The database's SQLAlchemy URL in plain text, for connecting (never for messages: see
        voxelflow.core.redact)."""
        url = self.database_url.get_secret_value() if self.database_url else ""
        return self.expand(url) if url else f"sqlite:///{self.root / 'voxelflow.db'}"

    @property
    def tracking_uri(self) -> str:
        """The MLflow tracking URI in plain text, for connecting (never for messages: see voxelflow.core.redact)."""
        uri = self.mlflow_tracking_uri.get_secret_value() if self.mlflow_tracking_uri else ""
        return uri or f"sqlite:///{self.root / 'mlflow.db'}"

    @property
    def artifact_root(self) -> str:
        if self.mlflow_artifact_root:
            return self.mlflow_artifact_root
        if self.store and "://" in self.store and not self.store.startswith("file://"):
            return self.store.rstrip("/") + "/mlflow-artifacts"
        return (self.root / "mlartifacts").as_uri()

    def expand(self, url: str) -> str:
        return url.replace("{home}", str(self.root))
