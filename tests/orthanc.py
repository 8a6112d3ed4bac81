"""A real Orthanc PACS for tests: Debian's `orthanc` with its DICOMweb plugin, in a temp dir, on a
free loopback port, with HTTP basic authentication; stopped by PID."""

from __future__ import annotations

import json
import shutil
import signal
import subprocess
import tempfile
import time
from pathlib import Path

import httpx

from tests.server import free_port

ORTHANC = shutil.which("Orthanc")
DICOMWEB_PLUGIN = Path("/usr/share/orthanc/plugins/libOrthancDicomWeb.so")
USER, PASSWORD = "uga", "orthanc-test-password"


class OrthancServer:
    def __init__(self) -> None:
        self.root = Path(tempfile.mkdtemp(prefix="uga-orthanc-"))
        self.port = free_port()
        self.proc: subprocess.Popen | None = None

    @staticmethod
    def available() -> str | None:
        if ORTHANC is None or not DICOMWEB_PLUGIN.exists():
            return "Orthanc with its DICOMweb plugin is not installed (apt-get install orthanc orthanc-dicomweb)"
        return None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    @property
    def dicomweb(self) -> str:
        return f"{self.url}/dicom-web"

    def start(self, timeout: float = 60) -> OrthancServer:
        config = {
            "Name": "uga-test-pacs",
            "StorageDirectory": str(self.root / "storage"),
            "IndexDirectory": str(self.root / "storage"),
            "HttpPort": self.port,
            "DicomServerEnabled": False,
            "RemoteAccessAllowed": False,
            "AuthenticationEnabled": True,
            "RegisteredUsers": {USER: PASSWORD},
            "Plugins": [str(DICOMWEB_PLUGIN)],
            "DicomWeb": {"Enable": True, "Root": "/dicom-web/", "EnableWado": False},
        }
        (self.root / "orthanc.json").write_text(json.dumps(config))
        with open(self.root / "orthanc.log", "ab") as log:
            self.proc = subprocess.Popen(
                [ORTHANC, str(self.root / "orthanc.json")], stdout=log, stderr=subprocess.STDOUT, cwd=self.root
            )
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"Orthanc exited:\n{(self.root / 'orthanc.log').read_text()[-2000:]}")
            try:
                if httpx.get(f"{self.url}/system", auth=(USER, PASSWORD), timeout=2).status_code == 200:
                    return self
            except httpx.HTTPError:
                pass
            time.sleep(0.2)
        self.stop()
        raise RuntimeError("Orthanc did not start")

    def stop(self) -> None:
        if self.proc and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(20)
            except subprocess.TimeoutExpired:
                self.proc.kill()
        shutil.rmtree(self.root, ignore_errors=True)
