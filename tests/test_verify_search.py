"""Verified search on a real collection (tiny random LLaVA, demo images, FAISS): the facade, the CLI and
REST. The order follows the model's relevance, every hit keeps its cosine, the cutoff drops hits and says
how many, the model thread scores queued verifications in one call, and what cannot verify is refused in
one line.
"""

from __future__ import annotations

import json

import numpy as np
import pytest
from fastapi.testclient import TestClient
from typer.testing import CliRunner

from fwd2bot_index.api import create_app
from fwd2bot_index.cli.main import app as cli
from fwd2bot_index.options import OptionError
from fwd2bot_index.service import ImageService, ServiceError
from fwd2bot_index.verification import MAX_VERIFY, VerifiedHits, check_verify, rerank

from .test_api_batching import held_worker
from .test_api_overload import DEADLINE, LOCAL

pytestmark = pytest.mark.usefixtures("one_torch_thread")

QUERY = "a small red circle at the top left"


def test_order_follows_relevance_and_every_hit_keeps_its_cosine(service):
    plain = service.search(text=QUERY, k=10)
    verified = service.search(text=QUERY, k=10, verify=10)
    assert isinstance(verified, VerifiedHits) and verified.verified == 10 and verified.dropped == 0
    assert {h.id for h in verified} == {h.id for h in plain}
    cosine = {h.id: h.score for h in plain}
    assert all(h.score == pytest.approx(cosine[h.id], abs=1e-6) for h in verified)
    relevance = [h.relevance for h in verified]
    assert relevance == sorted(relevance, reverse=True) and len(set(relevance)) > 1
    tokens = service.collection.get_tokens_batch([h.id for h in plain])  # the model, asked directly
    direct = dict(zip([h.id for h in plain], service.model.relevance(list(tokens), [QUERY] * 10,
                                                                     kind=service.strategy.tokens)))
    assert all(h.relevance == pytest.approx(direct[h.id], abs=2e-5) for h in verified)
    assert [h.id for h in verified] != [h.id for h in plain]  # re-ranked: the check has teeth


def test_cutoff_drops_hits_and_pages_after_reranking(service):
    full = service.search(text=QUERY, k=10, verify=10)
    cut = sorted(h.relevance for h in full)[5]
    kept = service.search(text=QUERY, k=10, verify=10, min_relevance=cut)
    assert [h.id for h in kept] == [h.id for h in full if h.relevance >= cut]
    assert kept.dropped == 10 - len(kept) > 0 and all(h.relevance >= cut for h in kept)
    none = service.search(text=QUERY, k=10, verify=10, min_relevance=1.0)
    assert list(none) == [] and none.dropped == 10  # "no good match"
    page = service.search(text=QUERY, k=3, offset=3, verify=10)
    assert [h.id for h in page] == [h.id for h in full[3:6]]
    wider = service.search(text=QUERY, k=6, verify=3)  # beyond the verified three: embedding order, no relevance
    plain = service.search(text=QUERY, k=6)
    assert [h.relevance is None for h in wider] == [False] * 3 + [True] * 3
    assert [h.id for h in wider[3:]] == [h.id for h in plain if h.id not in {x.id for x in wider[:3]}][:3]


def test_rerank_rules_without_a_model():
    from fwd2bot_index.collection import Hit

    hits = [Hit(i, f"/p/{i}", 1 - i / 10, {}) for i in range(5)]
    out = rerank(hits, [0.2, 0.9, 0.9, 0.1], k=5)
    assert [h.id for h in out] == [1, 2, 0, 3, 4]  # ties keep the embedding order; the fifth unverified last
    assert out[-1].relevance is None and out[0].score == hits[1].score
    cut = rerank(hits, [0.2, 0.9, 0.9, 0.1], k=5, min_relevance=0.5)
    assert [h.id for h in cut] == [1, 2] and cut.dropped == 2  # an unverified hit never passes a cutoff


@pytest.mark.parametrize("verify, min_relevance, text, words", [
    (0, None, True, "1 to 100"), (MAX_VERIFY + 1, None, True, "1 to 100"), (None, 0.5, True, "needs --verify"),
    (5, 1.5, True, "between 0 and 1"), (5, None, False, "needs a text query")])
def test_bad_values_are_one_line(verify, min_relevance, text, words):
    with pytest.raises(OptionError, match=words) as caught:
        check_verify(verify, min_relevance, text=text)
    assert "\n" not in str(caught.value)


def test_like_and_image_searches_refuse_verify(service):
    with pytest.raises(OptionError, match="needs a text query"):
        service.search(like=1, verify=5)


class EmbeddingOnly:
    """A model that embeds but cannot answer from stored tokens (no ``relevance``)."""

    def __init__(self, inner):
        self.encode_texts = inner.encode_texts
        self.fingerprint = inner.fingerprint


def test_embedding_only_collection_refuses_in_one_line(service):
    only = ImageService(service.collection, service.model_name, model=EmbeddingOnly(service.model))
    assert only.search(text=QUERY, k=3)  # plain search still works
    with pytest.raises(ServiceError, match="embedding-only") as caught:
        only.search(text=QUERY, k=3, verify=3)
    assert "\n" not in str(caught.value) and "without --verify" in str(caught.value)


# ------------------------------------------------------------------------------------------- CLI


def test_cli_json_carries_relevance_and_stderr_counts_the_dropped(demo, service):
    runner = CliRunner()
    base = ["search", QUERY, "--collection", str(demo.collection), "--model", str(demo.model_dir), "--local",
            "-k", "5", "--json"]
    result = runner.invoke(cli, base + ["--verify", "5"])
    assert result.exit_code == 0, result.output
    hits = json.loads(result.stdout)
    assert len(hits) == 5 and all(set(h) == {"id", "path", "score", "relevance"} for h in hits)
    assert [h["relevance"] for h in hits] == sorted((h["relevance"] for h in hits), reverse=True)
    none = runner.invoke(cli, base + ["--verify", "5", "--min-relevance", "1"])
    assert none.exit_code == 0 and json.loads(none.stdout) == []
    assert "5 of the top 5 hits dropped below relevance 1: no good match" in none.stderr
    bad = runner.invoke(cli, base + ["--verify", "101"])
    assert bad.exit_code == 2 and len(bad.stderr.strip().splitlines()) == 1 and "1 to 100" in bad.stderr
    lone = runner.invoke(cli, base + ["--min-relevance", "0.5"])
    assert lone.exit_code == 2 and "needs --verify" in lone.stderr


# ------------------------------------------------------------------------------------------ REST


@pytest.fixture(scope="module")
def client(service):
    with TestClient(create_app(service), base_url=LOCAL) as c:
        c.get("/readyz")
        yield c


def test_rest_hits_carry_relevance_and_the_cutoff_drops(client, service):
    body = client.post("/v1/search", json={"query": QUERY, "k": 5, "verify": 10}).json()
    expected = service.search(text=QUERY, k=5, verify=10)
    assert [h["id"] for h in body["results"]] == [h.id for h in expected]
    assert [h["relevance"] for h in body["results"]] == pytest.approx([h.relevance for h in expected], abs=2e-5)
    assert body["verified"] == 10 and body["dropped"] == 0 and all("score" in h for h in body["results"])
    cut = client.post("/v1/search", json={"query": QUERY, "k": 5, "verify": 10, "min_relevance": 1.0}).json()
    assert cut["results"] == [] and cut["dropped"] == 10
    filtered = client.post("/v1/search", json={"query": QUERY, "k": 3, "verify": 5, "filter": {"split": "test"}})
    assert filtered.status_code == 200 and all(h["relevance"] is not None for h in filtered.json()["results"])
    plain = client.post("/v1/search", json={"query": QUERY, "k": 3}).json()
    assert "relevance" not in plain["results"][0] and "verified" not in plain


@pytest.mark.parametrize("bad", [{"like": 1, "verify": 3}, {"query": QUERY, "verify": 101},
                                 {"query": QUERY, "min_relevance": 0.5}, {"query": QUERY, "verify": 0},
                                 {"query": QUERY, "verify": 3, "min_relevance": 2}])
def test_rest_refuses_what_cannot_verify(client, bad):
    response = client.post("/v1/search", json=bad)
    assert response.status_code == 422, response.text


def test_queued_verifications_share_one_model_call(service):
    """Two verified searches queued behind a held job are scored in one ``model.relevance`` call, each
    getting what it gets alone."""
    tokens = list(service.collection.get_tokens_batch([1, 2, 3, 4, 5]))
    kind = service.strategy.tokens
    alone = [service.model.relevance(tokens[:3], ["a red circle"] * 3, kind),
             service.model.relevance(tokens[3:], ["two shapes"] * 2, kind)]
    with held_worker(service) as (worker, release):
        futures = [worker.relevance(tokens[:3], "a red circle", kind), worker.relevance(tokens[3:], "two shapes", kind)]
        release.set()
        got = [f.result(DEADLINE) for f in futures]
    assert worker.verify_calls == 1 and worker.verified == 5
    for a, b in zip(got, alone):
        np.testing.assert_allclose(a, b, atol=2e-5)


def test_cli_verifies_through_a_running_server(demo, service, tmp_path, monkeypatch):
    """`f2b search --verify` while `f2b serve` of the collection runs: the server verifies, the CLI prints
    the same hits and relevances as a local run and the same count of dropped hits."""
    from fwd2bot_index.api import make_server
    from fwd2bot_index.api.testing import LiveServer, free_port
    from fwd2bot_index.cli.remote import announce

    monkeypatch.setenv("XDG_RUNTIME_DIR", str(tmp_path / "run"))
    runner = CliRunner()
    args = ["search", QUERY, "--collection", str(demo.collection), "-k", "4", "--verify", "8", "--json"]
    local = runner.invoke(cli, args + ["--local", "--model", str(demo.model_dir)])
    assert local.exit_code == 0, local.output
    expected = json.loads(local.stdout)
    cut = sorted(h["relevance"] for h in expected)[2]
    port = free_port()
    live = LiveServer(server=make_server(demo.collection, model=str(demo.model_dir), port=port, writable=False,
                                         log_level="warning"))
    with live, announce(demo.collection, "127.0.0.1", port):
        live.wait_ready()
        served = runner.invoke(cli, args)
        dropped = runner.invoke(cli, args + ["--min-relevance", str(cut)])
    assert served.exit_code == 0 and "answered by the running f2b serve" in served.stderr, served.output
    remote = json.loads(served.stdout)
    assert [h["id"] for h in remote] == [h["id"] for h in expected]
    assert [h["relevance"] for h in remote] == pytest.approx([h["relevance"] for h in expected], abs=2e-5)
    kept = json.loads(dropped.stdout)
    assert all(h["relevance"] >= cut for h in kept) and "hits dropped below relevance" in dropped.stderr
    assert f"{8 - len(kept)} of the top 8 hits dropped" in dropped.stderr


def test_the_recipe_records_whether_relevance_helps_ranking(tmp_path):
    """``record_relevance_verdict`` writes ``relevance_ranks_well`` from the measured verification (verify@20 R@1
    against the embedding's, seen split) into the checkpoint config; nothing is written when it was not measured.
    The search page's default follows it (``verification.verify_by_default``)."""
    from fwd2bot_index.model.config import Fwd2BotConfig
    from fwd2bot_index.training.demo.report import record_relevance_verdict
    from fwd2bot_index.verification import verify_by_default

    (tmp_path / "fwd2bot_config.json").write_text(Fwd2BotConfig().to_json(), encoding="utf-8")

    def measured(embedding: float, verified: float) -> dict:
        recall = {"embedding": {"1": embedding}, "verify@10": {"1": 1.0}, "verify@20": {"1": verified}}
        return {"verification": {"splits": {"test": {"retrieval_t2i": recall}}}}

    assert record_relevance_verdict(tmp_path, {}) is None
    assert Fwd2BotConfig.read(tmp_path).relevance_ranks_well is None
    assert record_relevance_verdict(tmp_path, measured(0.55, 0.20)) is False  # the deepest verification decides
    config = Fwd2BotConfig.read(tmp_path)
    assert config.relevance_ranks_well is False and verify_by_default(type("M", (), {"config": config})) is False
    assert record_relevance_verdict(tmp_path, measured(0.55, 0.61)) is True
    as_measured = {"verification": {"splits": {"test": {"retrieval_t2i": {  # int keys before a JSON round trip
        "embedding": {1: 0.55, 5: 0.9}, "verify@20": {1: 0.2, 5: 0.7}}}}}}
    assert record_relevance_verdict(tmp_path, as_measured) is False
    from fwd2bot_index.model.files import folder_fingerprint

    before = folder_fingerprint(tmp_path)
    results = {**measured(0.55, 0.61), "fingerprint": before}  # measured before the verdict changed the config
    assert record_relevance_verdict(tmp_path, results) is True
    assert results["fingerprint"] == folder_fingerprint(tmp_path) != before
    assert verify_by_default(type("M", (), {"config": Fwd2BotConfig.read(tmp_path)})) is True
    assert verify_by_default(type("M", (), {"config": Fwd2BotConfig()})) is True  # not measured: verify
