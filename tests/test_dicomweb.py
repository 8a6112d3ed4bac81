"""DICOMweb against a real PACS: Orthanc (Debian's, with its DICOMweb plugin and basic auth) on
loopback. Generated slides are dicomized (one instance per level, and concatenated), stored with
STOW-RS, segmented by their UIDs, and the DICOM SEG is stored back and read from Orthanc. PACS
errors (unknown series, wrong password, PACS down) fail the job with a reason code."""

from __future__ import annotations

import os
import time

import pydicom
import pytest

from service.integrations.dicomweb import COMPLETE, evict
from tests.dicom import ACCESSION, DICOMIZER, dicomize
from tests.inprocess import InProcessService
from tests.orthanc import PASSWORD, USER, OrthancServer
from tests.server import free_port, wait_job

MPP = 0.5


@pytest.fixture(scope="module")
def pacs(tmp_path_factory, source_slide):
    why = OrthancServer.available() or (None if DICOMIZER else "OrthancWSIDicomizer not installed (orthanc-wsi)")
    if why:
        pytest.skip(why)
    from dicomweb_client import DICOMwebClient

    root = tmp_path_factory.mktemp("pacs")
    orthanc = OrthancServer().start()
    client = DICOMwebClient(url=orthanc.dicomweb)
    client._session.auth = (USER, PASSWORD)
    series = {}
    for layout in ("one", "default"):
        folder = dicomize(source_slide, root / layout, mpp=MPP, layout=layout)
        datasets = [pydicom.dcmread(f) for f in sorted(folder.glob("*.dcm"))]
        client.store_instances(datasets)  # STOW-RS, as a scanner would
        series[layout] = (str(datasets[0].StudyInstanceUID), str(datasets[0].SeriesInstanceUID))
    yield {"orthanc": orthanc, "client": client, "series": series, "root": root}
    orthanc.stop()


@pytest.fixture(scope="module")
def service(pacs, tmp_path_factory):
    base = pacs["orthanc"].dicomweb.split("://")[1]
    endpoints = ",".join(
        [
            f"main=http://{USER}:{PASSWORD}@{base}",
            f"wrongpass=http://{USER}:not-the-password@{base}",
            f"down=http://127.0.0.1:{free_port()}/dicom-web",
        ]
    )
    root = tmp_path_factory.mktemp("svc")
    (root / "slides").mkdir()
    svc = InProcessService(root / "data", root / "slides", pacs=endpoints, dicomweb_retries=1, dicomweb_timeout_s=10)
    yield svc
    svc.close()


def submit(svc, pacs_name: str, study: str, series: str, patch_um: int = 512, **extra) -> dict:
    with svc.client("annotator") as c:
        body = {
            "dicomweb": {"pacs": pacs_name, "study": study, "series": series, **extra},
            "options": {"patch_um": patch_um},
        }
        r = c.post("/v1/jobs", json=body)
        assert r.status_code in (200, 202), r.text
        return wait_job(c, r.json()["id"])


@pytest.mark.e2e
def test_a_default_dicomizer_series_is_segmented_by_uid_and_its_seg_is_stored_back(pacs, service):
    study, series = pacs["series"]["default"]  # concatenation UIDs: OpenSlide would refuse it
    job = submit(service, "main", study, series, store_seg=True)
    assert job["state"] == "succeeded", job["error"]
    assert job["slide"] == f"dicomweb/main/{study}/{series}"
    ids = job["summary"]["source_identifiers"]
    assert ids["SeriesInstanceUID"] == series and ids["AccessionNumber"] == ACCESSION
    stored = job["summary"]["stored_to"]
    assert stored["pacs"] == "main"
    found = pacs["client"].search_for_series(study_instance_uid=study, search_filters={"Modality": "SEG"})
    assert [s["0020000E"]["Value"][0] for s in found] == [stored["series_instance_uid"]]
    [seg] = pacs["client"].retrieve_series(study, stored["series_instance_uid"])
    assert seg.ReferencedSeriesSequence[0].SeriesInstanceUID == series
    cached = service.settings.data_dir / "dicomweb" / "main" / study / series
    assert (cached / COMPLETE).exists() and len(list(cached.glob("*.dcm"))) >= 4
    again = submit(service, "main", study, series, store_seg=True)
    assert again["id"] == job["id"]  # the same series: the same job


@pytest.mark.e2e
def test_a_series_from_the_pacs_can_be_reviewed_and_corrected(pacs, service):
    study, series = pacs["series"]["one"]
    job = submit(service, "main", study, series)
    assert job["state"] == "succeeded", job["error"]
    with service.client("annotator") as c:
        items = c.get("/v1/queue", params={"slide": job["slide"], "k": 2}).json()["items"]
        assert items
        image = c.get(items[0]["links"]["image"])
        assert image.status_code == 200 and image.headers["content-type"] == "image/png"


@pytest.mark.e2e
@pytest.mark.parametrize(
    ("pacs_name", "which", "code"),
    [
        ("main", "missing", "pacs_not_found"),
        ("wrongpass", "one", "pacs_unauthorized"),
        ("down", "one", "pacs_unreachable"),
    ],
)
def test_pacs_errors_fail_the_job_with_a_reason(pacs, service, pacs_name, which, code):
    study, series = pacs["series"]["one"] if which == "one" else ("1.2.3", "1.2.3.4")
    job = submit(service, pacs_name, study, series, patch_um=256)  # not the succeeded job of that series
    assert job["state"] == "failed"
    from service.store import Store

    store = Store(service.settings.data_dir)
    try:
        assert store.jobs.failure_counts()[code] >= 1
    finally:
        store.close()
    assert pacs_name in job["error"]


@pytest.mark.e2e
def test_a_pacs_or_uid_not_allowed_is_refused_at_submission(pacs, service):
    with service.client("annotator") as c:
        for source, code in (
            ({"pacs": "elsewhere", "study": "1.2", "series": "1.2.3"}, "unknown_pacs"),
            ({"pacs": "main", "study": "1.2", "series": "1.2.3/../x"}, "invalid_uid"),
        ):
            r = c.post("/v1/jobs", json={"dicomweb": source})
            assert r.status_code == 400 and r.json()["error"]["code"] == code, r.text
        both = c.post("/v1/jobs", json={"slide": "a.tif", "dicomweb": {"pacs": "main", "study": "1", "series": "2"}})
        assert both.status_code == 422


def test_the_cache_evicts_the_least_recently_used_idle_series_first(tmp_path):
    for i, name in enumerate(("old", "mid", "new")):
        folder = tmp_path / "pacs" / "1.2" / name
        folder.mkdir(parents=True)
        (folder / "a.dcm").write_bytes(b"x" * 1000)
        (folder / COMPLETE).write_text("")
        t = time.time() - 3600 + i * 600
        os.utime(folder / COMPLETE, (t, t))
    removed = evict(tmp_path, max_bytes=1500, idle_s=60)
    assert [p.name for p in removed] == ["old", "mid"]  # down to 1000 bytes, oldest first
    assert (tmp_path / "pacs" / "1.2" / "new").exists()
    assert evict(tmp_path, max_bytes=0, idle_s=7200) == []  # everything recently used: nothing goes


def test_a_dicomweb_name_given_as_slide_is_checked_like_the_dicomweb_field(tmp_path):
    """No way around the checks: a `dicomweb/...` slide name must name a configured PACS and real UIDs
    (no path steps, no query), for jobs, reviews and corrections alike; nothing is fetched or queued."""
    (tmp_path / "slides").mkdir()
    svc = InProcessService(
        tmp_path / "data",
        tmp_path / "slides",
        pacs=f"main=http://127.0.0.1:{free_port()}/dicom-web",
        start_worker=False,
    )
    try:
        with svc.client("annotator") as c:
            for slide, code in (
                ("dicomweb/main/../..", "invalid_uid"),
                ("dicomweb/main/1.2/1.2.3?x=1", "invalid_uid"),
                ("dicomweb/other/1.2/1.2.3", "unknown_pacs"),
            ):
                r = c.post("/v1/jobs", json={"slide": slide})
                assert r.status_code == 400 and r.json()["error"]["code"] == code, (slide, r.text)
                r = c.post(
                    "/v1/corrections",
                    params={"slide": slide, "x": 0, "y": 0, "width": 64, "height": 64},
                    content=b"\x89PNG",
                    headers={"content-type": "image/png"},
                )
                assert r.status_code == 400, (slide, r.text)
        assert svc.runtime.store.jobs.counts()["queued"] == 0
        assert not (svc.settings.data_dir / "dicomweb").exists()
    finally:
        svc.close()


class HostilePacs:
    """A DICOMweb server that misbehaves on purpose, as no Orthanc does: ``mode`` says how.

    repeat: every QIDO page is the same three instances, whatever the offset; endless: every page is new;
    not_json: QIDO answers HTML; no_uids: results without a SOP Instance UID; not_dicom: QIDO is fine,
    WADO answers bytes that are no DICOM; traversal: QIDO lists UIDs that are paths; faithful: WADO
    answers the instance asked for; other_series: an instance of another study and series; redirect:
    WADO redirects elsewhere; deflated: the instance asked for, deflated."""

    def __init__(self, mode: str):
        import http.server
        import json
        import threading
        from urllib.parse import parse_qs, urlsplit

        self.mode, self.requests = mode, 0
        outer = self

        class Handler(http.server.BaseHTTPRequestHandler):
            def log_message(self, *args) -> None:
                pass

            def do_GET(self) -> None:
                outer.requests += 1
                url = urlsplit(self.path)
                offset = int(parse_qs(url.query).get("offset", ["0"])[0])
                if url.path.endswith("/instances") and outer.mode != "not_json":
                    first = 0 if outer.mode in ("repeat", "not_dicom") else offset
                    count = 3 if outer.mode in ("repeat", "not_dicom") else 1000
                    uid = {"vr": "UI", "Value": []} if outer.mode == "no_uids" else None
                    results = [{"00080018": uid or {"vr": "UI", "Value": [f"1.2.3.{first + i}"]}} for i in range(count)]
                    if outer.mode == "traversal":
                        paths = ("1.2.3.0", "../../../x", "/tmp/x")
                        results = [{"00080018": {"vr": "UI", "Value": [v]}} for v in paths]
                    if outer.mode in ("not_dicom", "traversal", *SINGLE) and offset:
                        results = []
                    if outer.mode in SINGLE:
                        results = results[:1]
                    self._answer(200, "application/dicom+json", json.dumps(results).encode())
                elif outer.mode == "not_json":
                    self._answer(200, "text/html", b"<html>login</html>")
                elif outer.mode == "redirect":
                    self.send_response(302)
                    self.send_header("Location", "http://127.0.0.1:9/elsewhere")
                    self.send_header("Content-Length", "0")
                    self.end_headers()
                elif outer.mode in ("faithful", "other_series", "deflated"):
                    study, series, sop = url.path.split("/")[-5::2]
                    if outer.mode == "other_series":
                        study, series = "9.9", "9.9.9"
                    kind = 'multipart/related; type="application/dicom"; boundary=b'
                    body = _instance(study, series, sop, deflated=outer.mode == "deflated")
                    self._answer(200, kind, b"--b\r\n\r\n" + body + b"\r\n--b--")
                else:
                    self._answer(
                        200, 'multipart/related; type="application/dicom"; boundary=b', b"--b\r\n\r\nnot dicom\r\n--b--"
                    )

            def _answer(self, status: int, kind: str, body: bytes) -> None:
                self.send_response(status)
                self.send_header("Content-Type", kind)
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

        self.server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        threading.Thread(target=self.server.serve_forever, daemon=True).start()
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}/dicom-web"

    def client(self):
        from service.integrations.dicomweb import Pacs, PacsEndpoint

        return Pacs(PacsEndpoint("hostile", self.url), timeout_s=5, retries=0)

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()


SINGLE = ("faithful", "other_series", "redirect", "deflated")  # modes that list one instance


def _instance(study: str, series: str, sop: str, deflated: bool = False) -> bytes:
    """A small Part 10 DICOM instance with these UIDs (deflated: in the Deflated Explicit VR LE syntax)."""
    import io

    import pydicom
    from pydicom.dataset import FileMetaDataset
    from pydicom.uid import DeflatedExplicitVRLittleEndian, ExplicitVRLittleEndian

    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID, meta.MediaStorageSOPInstanceUID = "1.2.840.10008.5.1.4.1.1.77.1.6", sop
    meta.TransferSyntaxUID = DeflatedExplicitVRLittleEndian if deflated else ExplicitVRLittleEndian
    ds = pydicom.Dataset()
    ds.file_meta = meta
    ds.SOPClassUID, ds.SOPInstanceUID = meta.MediaStorageSOPClassUID, sop
    ds.StudyInstanceUID, ds.SeriesInstanceUID = study, series
    out = io.BytesIO()
    ds.save_as(out, enforce_file_format=True)
    return out.getvalue()


@pytest.fixture
def hostile(request):
    pacs = HostilePacs(request.param)
    yield pacs
    pacs.close()


@pytest.mark.parametrize("hostile", ["repeat"], indirect=True)
def test_a_pacs_that_repeats_its_page_ends_the_listing(hostile):
    with hostile.client() as pacs:
        assert pacs.instances("1.2", "1.2.3") == ["1.2.3.0", "1.2.3.1", "1.2.3.2"]
    assert hostile.requests == 2  # the first page, and the same again: the end


@pytest.mark.parametrize("hostile", ["endless"], indirect=True)
def test_a_series_listing_beyond_the_instance_limit_is_refused(hostile):
    from service.integrations.dicomweb import PacsError
    from service.wsi.dicom import MAX_SERIES_FILES

    with hostile.client() as pacs, pytest.raises(PacsError) as refused:
        pacs.instances("1.2", "1.2.3")
    assert refused.value.code == "series_too_large"
    assert hostile.requests == MAX_SERIES_FILES // 1000 + 1


@pytest.mark.parametrize(
    ("hostile", "code"),
    [("not_json", "pacs_error"), ("no_uids", "pacs_not_found"), ("not_dicom", "pacs_error")],
    indirect=["hostile"],
)
def test_answers_that_are_not_dicomweb_fail_with_a_reason_and_leave_nothing(hostile, code, tmp_path):
    from service.integrations.dicomweb import PacsError

    folder = tmp_path / "hostile" / "1.2" / "1.2.3"
    with hostile.client() as pacs, pytest.raises(PacsError) as refused:
        pacs.fetch_series("1.2", "1.2.3", folder, max_bytes=2**20)
    assert refused.value.code == code and "hostile" in refused.value.message
    assert not folder.parent.exists() or not any(folder.parent.iterdir())  # no series, no .part left


@pytest.mark.parametrize("hostile", ["traversal"], indirect=True)
def test_instance_uids_that_are_paths_are_refused_before_anything_is_written_or_fetched(hostile, tmp_path):
    from service.integrations.dicomweb import PacsError

    folder = tmp_path / "cache" / "hostile" / "1.2" / "1.2.3"
    with hostile.client() as pacs, pytest.raises(PacsError) as refused:
        pacs.fetch_series("1.2", "1.2.3", folder, max_bytes=2**20)
    assert refused.value.code == "pacs_error" and "not a DICOM UID: '../../../x'" in refused.value.message
    assert hostile.requests == 1  # the listing only: no download of any instance it listed
    assert sorted(p.name for p in tmp_path.rglob("*") if p.is_file()) == []


@pytest.mark.parametrize(
    ("hostile", "message"),
    [
        ("other_series", "not the series asked for"),
        ("redirect", "redirected an instance download"),
        ("deflated", "sent a deflated instance"),
    ],
    indirect=["hostile"],
)
def test_a_download_that_is_not_the_instance_asked_for_fails_and_leaves_nothing(hostile, message, tmp_path):
    from service.integrations.dicomweb import PacsError

    folder = tmp_path / "hostile" / "1.2" / "1.2.3"
    with hostile.client() as pacs, pytest.raises(PacsError) as refused:
        pacs.fetch_series("1.2", "1.2.3", folder, max_bytes=2**20)
    assert refused.value.code == "pacs_error" and message in refused.value.message
    assert not folder.parent.exists() or not any(folder.parent.iterdir())


@pytest.mark.parametrize("hostile", ["faithful"], indirect=True)
def test_the_instance_asked_for_is_cached_under_its_uid(hostile, tmp_path):
    folder = tmp_path / "hostile" / "1.2" / "1.2.3"
    with hostile.client() as pacs:
        assert pacs.fetch_series("1.2", "1.2.3", folder, max_bytes=2**20) == folder
    assert sorted(p.name for p in folder.iterdir() if p.suffix == ".dcm") == ["1.2.3.0.dcm"]


@pytest.mark.parametrize("hostile", ["repeat"], indirect=True)
def test_a_check_that_raises_stops_the_fetch_before_the_next_request(hostile, tmp_path):
    class Stop(Exception):
        pass

    def check() -> None:
        if hostile.requests >= 1:
            raise Stop()

    with hostile.client() as pacs, pytest.raises(Stop):
        pacs.fetch_series("1.2", "1.2.3", tmp_path / "s", max_bytes=2**20, check=check)
    assert hostile.requests == 1


@pytest.mark.e2e
def test_a_series_larger_than_the_cache_is_refused_and_leaves_nothing(pacs, service, tmp_path):
    from service.integrations.dicomweb import PacsError
    from service.loop.slides import pacs_client

    study, series = pacs["series"]["one"]
    folder = tmp_path / "main" / study / series
    with pacs_client(service.settings, "main") as client, pytest.raises(PacsError) as refused:
        client.fetch_series(study, series, folder, max_bytes=4096)
    assert refused.value.code == "series_too_large" and "UGA_DICOMWEB_CACHE_MB" in refused.value.message
    assert not any(folder.parent.iterdir())
