"""The service facade over a real collection and a tiny real model."""

from __future__ import annotations

import os
import shutil

import numpy as np
import pytest

from fwd2bot_index.collection import CollectionMismatchError
from fwd2bot_index.imaging import load_image
from fwd2bot_index.model import Fwd2Bot
from fwd2bot_index.model.tiny import TinySpec, save_tiny_llava
from fwd2bot_index.service import NotFoundError, ServiceError, open_service, read_sidecar
from fwd2bot_index.synthetic import write_demo_data


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    return save_tiny_llava(tmp_path_factory.mktemp("m") / "tiny64", TinySpec(image_size=64), seed=0)


@pytest.fixture
def photos(tmp_path):
    """24 real scenes plus broken files of several kinds."""
    write_demo_data(tmp_path / "data", n=24, seed=3)
    images = tmp_path / "data" / "images"
    (images / "notes.jpg").write_text("this is not an image")
    (images / "empty.png").write_bytes(b"")
    (images / "half.png").write_bytes((images / "000001.png").read_bytes()[:200])
    return images


def test_index_search_ask(tmp_path, model_dir, photos):
    with open_service(tmp_path / "c", model=str(model_dir), device="cpu", create=True) as svc:
        report = svc.index([photos], batch_size=8)
        assert report.indexed == 24 and report.duplicates == 0
        failed = {os.path.basename(p): r for p, r in report.failed}
        assert set(failed) == {"notes.jpg", "empty.png", "half.png"}
        assert "truncated" in failed["half.png"]
        hits = svc.search(text="a red circle", k=5)
        assert len(hits) == 5 and all(os.path.isabs(h.path) for h in hits)
        scores = [h.score for h in hits]
        assert scores == sorted(scores, reverse=True)
        # an indexed image searched by itself comes back first with cosine ~1
        target = str(photos / "000005.png")
        top = svc.search(image=target, k=1)[0]
        assert top.path == target and top.score == pytest.approx(1.0, abs=1e-3)
        like = svc.search(like=target, k=3)
        assert all(h.path != target for h in like)
        info = svc.info()
        assert info["indexed"] == 24 and info["failed"] == 3 and info["bytes_per_image"] > 0
        assert svc.verify().ok


def test_ask_from_stored_tokens_equals_fresh_tokens(tmp_path, model_dir, photos):
    with open_service(tmp_path / "c", model=str(model_dir), device="cpu", create=True) as svc:
        svc.index([photos])
        path = str(photos / "000007.png")
        image_id = svc.resolve(path)
        stored = svc.collection.get_tokens(image_id)
        fresh = svc.model.encode_images([load_image(path)], strategy=svc.strategy).tokens[0]
        np.testing.assert_allclose(stored, fresh, rtol=1e-2, atol=1e-2)  # fp16 storage
        at_storage_precision = fresh.astype(np.float16).astype(np.float32)
        question = "what color is the large shape?"
        expected = svc.model.answer(at_storage_precision, question, max_new_tokens=8, kind=svc.strategy.tokens)
        assert svc.ask(image_id, question, max_new_tokens=8) == expected
        assert svc.ask(path, question, max_new_tokens=8) == expected
        with pytest.raises(NotFoundError, match="not in the collection"):
            svc.ask(99999, question)
        with pytest.raises(ServiceError, match="empty"):
            svc.ask(image_id, "  ")


def test_other_model_or_strategy_is_refused(tmp_path, model_dir, photos):
    with open_service(tmp_path / "c", model=str(model_dir), device="cpu", create=True) as svc:
        svc.index([photos])
    other = save_tiny_llava(tmp_path / "other", TinySpec(image_size=64), seed=9)
    with pytest.raises(CollectionMismatchError, match="--reindex"):
        open_service(tmp_path / "c", model=str(other), device="cpu")
    with pytest.raises(CollectionMismatchError, match="strategy"):
        open_service(tmp_path / "c", device="cpu", strategy="full")
    # --reindex rebuilds with the new model
    with open_service(tmp_path / "c", model=str(other), device="cpu", create=True, reindex=True) as svc:
        assert svc.info()["indexed"] == 0
        svc.index([photos])
        assert svc.info()["indexed"] == 24


def test_incremental_dedup_and_prune(tmp_path, model_dir, photos):
    with open_service(tmp_path / "c", model=str(model_dir), device="cpu", create=True) as svc:
        svc.index([photos])
    shutil.copy(photos / "000003.png", photos / "copy-of-3.png")
    (photos / "000004.png").unlink()
    with open_service(tmp_path / "c", device="cpu", writable=True) as svc:
        report = svc.index([photos], prune=True)
        assert report.indexed == 0 and report.duplicates == 1 and report.pruned == 1
        # the failures are not retried until they change, and are reported as still failing (issue 14)
        assert report.unchanged == 23 and len(report.still_failing) == 3
        row = svc.get(str(photos / "copy-of-3.png"))
        assert str(photos / "000003.png") in row.paths
        assert svc.info()["indexed"] == 23 and svc.verify().ok


def test_search_validation(tmp_path, model_dir, photos):
    with open_service(tmp_path / "c", model=str(model_dir), device="cpu", create=True) as svc:
        svc.index([photos])
        with pytest.raises(ServiceError, match="exactly one"):
            svc.search(text="x", image=str(photos / "000001.png"))
        with pytest.raises(ServiceError, match="empty"):
            svc.search(text="   ")
        with pytest.raises(ServiceError, match="finite numbers"):
            svc.search(embedding=[1.0, 2.0])
        assert svc.search(text="a red circle", k=5, min_score=1.5) == []


def test_sidecar_metadata_is_stored_and_filterable(tmp_path, model_dir, photos):
    (photos.parent / "meta.csv").write_text("path,album\nimages/000001.png,beach\nimages/000002.png,city\n")
    with open_service(tmp_path / "c", model=str(model_dir), device="cpu", create=True) as svc:
        svc.index([photos], metadata=photos.parent / "meta.csv")
        hits = svc.search(text="a shape", k=10, filter={"album": "beach"})
        assert [h.path for h in hits] == [str(photos / "000001.png")]
    (photos.parent / "bad.json").write_text("[{\"album\": 1}]")
    with pytest.raises(ServiceError, match="record 1 has no 'path'"):
        read_sidecar(photos.parent / "bad.json")
