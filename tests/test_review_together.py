"""Two pathologists on one queue, in-process. Withdrawing a correction: its annotator or an admin only,
with a reason; kept for the record, out of the queue's 'corrected' and out of every later run; the same
mask sent again reinstates it. Claims: a patch one reviewer has open is not another's to take."""

from __future__ import annotations

import io
import time

import numpy as np
import pytest
from PIL import Image

from service.loop.review import reviewed_boxes
from service.loop.store_metrics import StoreCollector
from tests.inprocess import InProcessService
from tests.server import finished_patch_job, hostile_slide_root


@pytest.fixture(scope="module")
def env(tmp_path_factory, source_slide):
    root = tmp_path_factory.mktemp("withdrawal")
    service = InProcessService(root / "data", hostile_slide_root(root, source_slide))
    with service.client("annotator") as c:
        assert finished_patch_job(c)["state"] == "succeeded"
    yield service
    service.close()


def _withdrawn_metric(env) -> float:
    """``uga_corrections_withdrawn`` as the store's collector exports it."""
    [family] = [f for f in StoreCollector(env.runtime.store).collect() if f.name == "uga_corrections_withdrawn"]
    return family.samples[0].value


def _pending(env, role: str = "viewer") -> list[str]:
    with env.client(role) as c:
        return [i["id"] for i in c.get("/v1/queue", params={"slide": "cases/a.tif"}).json()["items"]]


def _correct(env, item_id: str, role: str = "annotator", headers: dict | None = None):
    with env.client(role) as c:
        got = c.get(f"/v1/queue/items/{item_id}/mask.png", headers=headers or {})
        mask = np.asarray(Image.open(io.BytesIO(got.content)))
        drawn = np.zeros_like(mask)
        drawn[: mask.shape[0] // 3] = 255
        buf = io.BytesIO()
        Image.fromarray(drawn).save(buf, format="PNG")
        return c.post(
            f"/v1/queue/items/{item_id}/correction",
            content=buf.getvalue(),
            headers={"content-type": "image/png", **(headers or {})},
        )


def test_the_annotator_withdraws_a_correction_and_its_patch_returns_to_the_queue(env):
    item = _pending(env)[0]
    sent = _correct(env, item)
    assert sent.status_code == 201, sent.text
    cid = sent.json()["id"]
    assert item not in _pending(env)
    withdrawn_before = _withdrawn_metric(env)
    store = env.runtime.store
    b = store.queue.item(item).bbox_level0
    box = (b["x"], b["y"], b["width"], b["height"])
    assert box in reviewed_boxes(store, "cases/a.tif")  # no later queue proposes this tissue
    unseen = {c.id for c in env.runtime.store.corrections.unseen()}
    assert cid in unseen
    with env.client("annotator") as c:
        r = c.post(f"/v1/corrections/{cid}/withdraw", json={"reason": "drew the wrong gland"})
        assert r.status_code == 200, r.text
        body = r.json()
        assert body["withdrawn_by"] == sent.json()["annotator"] and body["withdrawn_reason"] == "drew the wrong gland"
        assert body["withdrawn_at"] and body["learned_by"] == [] and body["current_model_learned_it"] is False
        assert c.get(f"/v1/corrections/{cid}").json()["withdrawn_at"] == body["withdrawn_at"]
        again = c.post(f"/v1/corrections/{cid}/withdraw", json={"reason": "twice"}).json()
        assert again["withdrawn_at"] == body["withdrawn_at"] and again["withdrawn_reason"] == "drew the wrong gland"
        assert c.get(f"/v1/queue/items/{item}").json()["status"] == "pending"
    assert item in _pending(env)
    assert _withdrawn_metric(env) == withdrawn_before + 1  # once, though asked twice
    assert box not in reviewed_boxes(store, "cases/a.tif")  # to be proposed again
    assert cid not in {c.id for c in store.corrections.unseen()}
    assert cid not in {c.id for c in store.corrections.unused_for_training(store.models.current())}
    assert [a["action"] for a in store.db.all("SELECT action FROM audit WHERE target = ?", (cid,))] == [
        "correction.ingest",
        "correction.withdraw",
    ]

    resent = _correct(env, item)  # the very mask again: meant after all
    assert resent.status_code == 201, resent.text
    assert resent.json()["id"] == cid and resent.json()["withdrawn_at"] is None
    assert item not in _pending(env) and cid in {c.id for c in store.corrections.unseen()}
    assert _withdrawn_metric(env) == withdrawn_before  # it stands again
    assert box in reviewed_boxes(store, "cases/a.tif")


def test_only_its_annotator_or_an_admin_may_withdraw_and_a_bad_request_changes_nothing(env):
    from service.store import Store

    item = _pending(env)[0]
    cid = _correct(env, item).json()["id"]
    _, other = Store.open(env.settings).tokens.issue("dr.b", "annotator")
    with env.client(None) as c:
        refused = c.post(
            f"/v1/corrections/{cid}/withdraw", json={"reason": "not mine"}, headers={"Authorization": f"Bearer {other}"}
        )
    assert refused.status_code == 403 and refused.json()["error"]["code"] == "not_your_correction"
    with env.client("viewer") as c:
        assert c.post(f"/v1/corrections/{cid}/withdraw", json={"reason": "x"}).status_code == 403
    with env.client("annotator") as c:
        for bad in ({}, {"reason": ""}, {"reason": "x" * 501}, {"reason": "ok", "extra": 1}):
            r = c.post(f"/v1/corrections/{cid}/withdraw", json=bad)
            assert r.status_code == 422 and "error" in r.json(), (bad, r.text)
        missing = c.post("/v1/corrections/nope/withdraw", json={"reason": "x"})
        assert missing.status_code == 404 and missing.json()["error"]["code"] == "correction_not_found"
        assert c.get(f"/v1/corrections/{cid}").json()["withdrawn_at"] is None
    assert item not in _pending(env)
    with env.client("admin") as c:
        r = c.post(f"/v1/corrections/{cid}/withdraw", json={"reason": "QC: off-slide"})
        assert r.status_code == 200 and r.json()["withdrawn_by"] != r.json()["annotator"]
    assert item in _pending(env)


def test_a_patch_one_reviewer_has_open_is_out_of_anothers_queue_until_they_let_go(env):
    from service.store import Store

    item = _pending(env)[0]
    _, other = Store.open(env.settings).tokens.issue("dr.c", "annotator")
    dr_c = {"Authorization": f"Bearer {other}"}
    with env.client("annotator") as c:
        held = c.post(f"/v1/queue/items/{item}/claim")
        assert held.status_code == 200, held.text
        assert held.json()["until"] == pytest.approx(time.time() + env.settings.review_claim_s, abs=5)
        assert c.post(f"/v1/queue/items/{item}/claim").status_code == 200  # renewing one's own
        assert item in _pending(env, "annotator") and item in _pending(env, "viewer")  # a viewer takes none
    with env.client(None) as c:
        theirs = [i["id"] for i in c.get("/v1/queue", params={"slide": "cases/a.tif"}, headers=dr_c).json()["items"]]
        assert item not in theirs and theirs
        taken = c.post(f"/v1/queue/items/{item}/claim", headers=dr_c)
        assert taken.status_code == 409 and taken.json()["error"]["code"] == "claimed_by_another"
        assert "min" in taken.json()["error"]["message"]
        assert c.post(f"/v1/queue/items/{item}/skip", headers=dr_c).status_code == 409
        assert _correct(env, item, role=None, headers=dr_c).status_code == 409
        assert c.delete(f"/v1/queue/items/{item}/claim", headers=dr_c).status_code == 204  # not theirs: stays
        assert c.post(f"/v1/queue/items/{item}/claim", headers=dr_c).status_code == 409
    with env.client("annotator") as c:
        assert c.delete(f"/v1/queue/items/{item}/claim").status_code == 204
    with env.client(None) as c:
        assert c.post(f"/v1/queue/items/{item}/claim", headers=dr_c).status_code == 200
        assert c.delete(f"/v1/queue/items/{item}/claim", headers=dr_c).status_code == 204
        assert c.post("/v1/queue/items/nope/claim", headers=dr_c).status_code == 404


def test_a_hold_lapses_when_its_reviewer_walks_away(env):
    item = _pending(env)[0]
    slide = "cases/a.tif"
    held, until = env.runtime.store.queue.claim(slide, item, "dr.gone", hold_s=1.5)  # long enough under load
    assert held == "dr.gone" and item not in _pending(env, "annotator")
    time.sleep(max(0.0, until - time.time()) + 0.05)
    assert item in _pending(env, "annotator")
    assert env.runtime.store.queue.claim(slide, item, "dr.next", hold_s=60)[0] == "dr.next"
    env.runtime.store.queue.release(slide, item, "dr.next")


def test_a_reviewer_holds_one_patch_at_a_time_and_an_admin_can_let_go_of_anyones(env):
    first, second = _pending(env, "annotator")[:2]
    queue = env.runtime.store.queue
    slide = "cases/a.tif"
    with env.client("annotator") as c:
        me = c.get("/v1/me").json()["name"]
        assert c.post(f"/v1/queue/items/{first}/claim").status_code == 200
        assert c.post(f"/v1/queue/items/{second}/claim").status_code == 200  # moving on lets go of the first
    assert queue.holder(slide, first) is None and queue.holder(slide, second)[0] == me
    with env.client("admin") as c:
        assert c.delete(f"/v1/queue/items/{second}/claim").status_code == 204  # a reviewer who walked away
    assert queue.holder(slide, second) is None


def test_a_withdrawal_needs_a_reason_in_words_and_a_resend_by_another_is_theirs(env):
    from service.store import Store

    item = _pending(env)[0]
    cid = _correct(env, item).json()["id"]
    with env.client("annotator") as c:
        blank = c.post(f"/v1/corrections/{cid}/withdraw", json={"reason": "   "})
        assert blank.status_code == 422 and c.get(f"/v1/corrections/{cid}").json()["withdrawn_at"] is None
        stripped = c.post(f"/v1/corrections/{cid}/withdraw", json={"reason": "  slip  "}).json()
        assert stripped["withdrawn_reason"] == "slip"
    _, token = Store.open(env.settings).tokens.issue("dr.d", "annotator")
    theirs = {"Authorization": f"Bearer {token}"}
    again = _correct(env, item, role=None, headers=theirs)  # the same mask, drawn by another pathologist
    assert again.status_code == 201 and again.json()["id"] == cid and again.json()["annotator"] == "dr.d"
    with env.client(None) as c:
        assert c.post(f"/v1/corrections/{cid}/withdraw", json={"reason": "mine now"}, headers=theirs).status_code == 200
