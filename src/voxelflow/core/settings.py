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
