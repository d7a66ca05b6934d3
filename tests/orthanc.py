"""A real PACS for the tests: Orthanc (the distribution's ``orthanc`` and ``orthanc-dicomweb`` packages) on
free ports with its own storage folder, started and stopped by the tests.

This Orthanc binds its DICOM and HTTP ports on every address (it has no bind-address setting), so it is
given the safeguards it has: its REST API answers loopback only (``RemoteAccessAllowed`` false), a C-STORE
must call its own AE title (``DicomCheckCalledAet``), and only voxelflow's AE title, calling from
127.0.0.1, is a known modality; unknown callers may neither store nor echo. Tests that need it skip,
saying why, where the binary or the DICOMweb plugin is absent.
"""

from __future__ import annotations

import contextlib
import json
import shutil
import subprocess
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from flows.server import free_port
from tests.services import stop, wait_until

BINARIES = ("Orthanc", "/usr/sbin/Orthanc", "/usr/bin/Orthanc")
DICOMWEB_PLUGIN = Path("/usr/share/orthanc/plugins/libOrthancDicomWeb.so")
MISSING = ("Orthanc is not installed (apt-get install -y orthanc orthanc-dicomweb; .ci/run installs them "
           "where it runs as root)")


def binary() -> str | None:
    """The Orthanc executable, or None where it is not installed (with its DICOMweb plugin)."""
    if not DICOMWEB_PLUGIN.exists():
        return None
    for name in BINARIES:
        found = shutil.which(name)
        if found:
            return found
    return None


class Orthanc:
    """One Orthanc server with its storage under ``workdir``; :meth:`start` and :meth:`stop` may be called
    again (the same ports and storage), so a test can take the PACS away and bring it back."""

    def __init__(self, workdir: Path, aet: str = "ORTHANC", callers: tuple[str, ...] = ("VOXELFLOW",)) -> None:
        exe = binary()
        if exe is None:
            pytest.skip(MISSING)
        self.exe, self.workdir, self.aet = exe, Path(workdir), aet
        self.http_port, self.dicom_port = free_port(), free_port()
        self.workdir.mkdir(parents=True, exist_ok=True)
        self.config = self.workdir / "orthanc.json"
        self.log = self.workdir / "orthanc.log"
        self.config.write_text(json.dumps({
            "Name": "voxelflow-tests",
            "StorageDirectory": str(self.workdir / "storage"),
            "IndexDirectory": str(self.workdir / "storage"),
            "HttpPort": self.http_port,
            "DicomPort": self.dicom_port,
            "DicomAet": aet,
            "RemoteAccessAllowed": False,
            "AuthenticationEnabled": False,
            "DicomCheckCalledAet": True,
            "DicomAlwaysAllowStore": False,
            "DicomAlwaysAllowEcho": False,
            "DicomCheckModalityHost": True,
            "DicomModalitiesInDatabase": False,
            "DicomModalities": {ae.lower(): [ae, "127.0.0.1", 104] for ae in callers},
            "Plugins": [str(DICOMWEB_PLUGIN)],
            "DicomWeb": {"Enable": True, "Root": "/dicom-web/"},
            "SaveJobs": False,
            "ExecuteLuaEnabled": False,
            "RestApiWriteToFileSystemEnabled": False,
        }, indent=2))
        self.proc: subprocess.Popen | None = None

    # ------------------------------------------------------------ addresses
    @property
    def http_url(self) -> str:
        return f"http://127.0.0.1:{self.http_port}"

    @property
    def dicomweb_url(self) -> str:
        """Its DICOMweb root as a voxelflow destination or source (``dicomweb+http://...``)."""
        return f"dicomweb+{self.http_url}/dicom-web"

    @property
    def dicom_url(self) -> str:
        """Its Storage SCP as a voxelflow destination (``dicom://AE@host:port``)."""
        return f"dicom://{self.aet}@127.0.0.1:{self.dicom_port}"

    # ------------------------------------------------------------ life
    def start(self, timeout: float = 30) -> Orthanc:
        if self.proc is not None and self.proc.poll() is None:
            return self
        with open(self.log, "a") as fh:
            self.proc = subprocess.Popen([self.exe, str(self.config)], stdout=fh, stderr=subprocess.STDOUT,
                                         cwd=self.workdir)
        wait_until(lambda: httpx.get(f"{self.http_url}/system", timeout=1).status_code == 200, timeout,
                   "Orthanc", self.proc, self.log)
        return self

    def stop(self) -> None:
        if self.proc is not None:
            stop(self.proc)  # SIGTERM: Orthanc closes its index and exits
            self.proc = None

    def __enter__(self) -> Orthanc:
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()

    # ------------------------------------------------------------ what it holds
    def get(self, path: str) -> object:
        response = httpx.get(f"{self.http_url}{path}", timeout=30)
        response.raise_for_status()
        return response.json()

    def instances(self) -> list[dict]:
        """Every stored instance with its main tags (``MainDicomTags``, ``ParentSeries``, ...)."""
        return [self.get(f"/instances/{i}") for i in self.get("/instances")]

    def sop_instance_uids(self) -> set[str]:
        return {i["MainDicomTags"]["SOPInstanceUID"] for i in self.instances()}

    def file(self, sop_instance_uid: str) -> bytes:
        """The stored DICOM file of one instance, as Orthanc holds it."""
        found = httpx.post(f"{self.http_url}/tools/find", timeout=30, json={
            "Level": "Instance", "Query": {"SOPInstanceUID": sop_instance_uid}})
        found.raise_for_status()
        (one,) = found.json()
        response = httpx.get(f"{self.http_url}/instances/{one}/file", timeout=30)
        response.raise_for_status()
        return response.content

    def clear(self) -> None:
        """Delete every patient (and so every study, series and instance) it holds."""
        for patient in self.get("/patients"):
            httpx.delete(f"{self.http_url}/patients/{patient}", timeout=30).raise_for_status()


@contextlib.contextmanager
def running_orthanc(workdir: Path, **kwargs) -> Iterator[Orthanc]:
    """An :class:`Orthanc` started for the block and stopped after it (skips the test where it is absent)."""
    with Orthanc(workdir, **kwargs) as pacs:
        yield pacs
