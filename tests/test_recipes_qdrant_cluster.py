"""The Qdrant cluster recipe: collection options reach qdrant-client's create_collection (its local mode
stands in for a server: none can run here), `f2b index` passes them through, and deploy/ parses.

What is not tested, because no Qdrant server can run here: that a real cluster applies shards, replicas
and quantization (local mode accepts those arguments and keeps only the on-disk vector settings)."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import qdrant_client
import yaml
from qdrant_client import models as m
from typer.testing import CliRunner

from fwd2bot_index.cli.main import app
from fwd2bot_index.collection.qdrant_index import QdrantServerIndex, cluster_settings

REPO = Path(__file__).resolve().parents[1]


class RecordingClient(qdrant_client.QdrantClient):
    """The real qdrant-client (local mode here), recording the create_collection calls it serves."""

    calls: list[dict] = []

    def create_collection(self, collection_name, **kwargs):
        RecordingClient.calls.append({"name": collection_name, **kwargs})
        return super().create_collection(collection_name, **kwargs)


@pytest.fixture
def recorded(monkeypatch):
    RecordingClient.calls = []
    monkeypatch.setattr(qdrant_client, "QdrantClient", RecordingClient)
    return RecordingClient.calls


def test_cluster_settings_name_the_qdrant_arguments():
    assert cluster_settings() == {}
    got = cluster_settings(shards=6, replication_factor=2, write_consistency_factor=2, on_disk=True,
                           quantization="int8")
    assert {k: got[k] for k in ("shard_number", "replication_factor", "write_consistency_factor", "on_disk_payload")} \
        == {"shard_number": 6, "replication_factor": 2, "write_consistency_factor": 2, "on_disk_payload": True}
    assert got["quantization_config"].scalar.type == m.ScalarType.INT8
    assert isinstance(cluster_settings(quantization="binary")["quantization_config"], m.BinaryQuantization)
    with pytest.raises(ValueError, match="quantization 'pq'"):
        cluster_settings(quantization="pq")
    with pytest.raises(ValueError, match="shards must be a whole number >= 1, got 0"):
        cluster_settings(shards=0)


def test_server_index_creates_its_collection_with_the_cluster_options(recorded):
    index = QdrantServerIndex(":memory:", dim=8, collection_name="photos", shards=3, replication_factor=2,
                              write_consistency_factor=2, on_disk=True, quantization="int8")
    (call,) = recorded
    assert call["name"] == "photos"
    assert (call["shard_number"], call["replication_factor"], call["write_consistency_factor"]) == (3, 2, 2)
    assert call["vectors_config"].on_disk and call["vectors_config"].hnsw_config.on_disk
    assert call["vectors_config"].distance == m.Distance.DOT and call["on_disk_payload"] is True
    assert call["quantization_config"].scalar.always_ram
    # local mode accepted all of it and keeps the on-disk vector settings
    params = index.client.get_collection("photos").config.params.vectors
    assert params.on_disk and params.hnsw_config.on_disk
    # the index works as ever, and clear() recreates the collection with the same options
    rng = np.random.default_rng(0)
    vectors = rng.normal(size=(5, 8)).astype(np.float32)
    vectors /= np.linalg.norm(vectors, axis=1, keepdims=True)
    index.add(np.arange(5), vectors)
    assert index.search(vectors[2:3], 1)[0][0][0] == 2
    index.clear()
    assert len(index) == 0 and len(recorded) == 2
    assert {k: v for k, v in recorded[1].items()} == {k: v for k, v in call.items()}
    index.close()


def test_f2b_index_passes_the_options_and_records_them(recorded, tmp_path):
    from fwd2bot_index.model.tiny import TinySpec, save_tiny_llava
    from fwd2bot_index.synthetic import write_demo_data

    model = save_tiny_llava(tmp_path / "tiny", TinySpec(image_size=64), seed=0)
    write_demo_data(tmp_path / "data", n=4, seed=0)
    coll = tmp_path / "coll"
    runner = CliRunner()
    result = runner.invoke(app, ["index", str(tmp_path / "data" / "images"), "--collection", str(coll),
                                 "--model", str(model), "--device", "cpu", "--backend", "qdrant-server",
                                 "--qdrant-url", ":memory:", "--qdrant-shards", "6", "--qdrant-replicas", "2",
                                 "--qdrant-on-disk", "--qdrant-quantization", "binary", "--json"])
    assert result.exit_code == 0, result.output
    assert json.loads(result.stdout)["indexed"] == 4
    # every collection the run created (":memory:" is a fresh stand-in each time it is opened) had them
    assert recorded and {(c["shard_number"], c["replication_factor"]) for c in recorded} == {(6, 2)}
    assert all(isinstance(c["quantization_config"], m.BinaryQuantization) for c in recorded)
    options = json.loads((coll / "manifest.json").read_text())["backend_options"]
    assert {k: options[k] for k in ("shards", "replication_factor", "on_disk", "quantization")} == \
        {"shards": 6, "replication_factor": 2, "on_disk": True, "quantization": "binary"}

    refused = runner.invoke(app, ["index", str(tmp_path / "data" / "images"), "--collection", str(tmp_path / "other"),
                                  "--model", str(model), "--qdrant-shards", "2"])
    assert refused.exit_code == 2 and "add --backend qdrant-server" in refused.output
    assert not (tmp_path / "other").exists()
    bad = runner.invoke(app, ["index", str(tmp_path / "data" / "images"), "--collection", str(tmp_path / "bad"),
                              "--model", str(model), "--device", "cpu", "--backend", "qdrant-server",
                              "--qdrant-url", ":memory:", "--qdrant-quantization", "pq"])
    assert bad.exit_code == 2 and "--qdrant-quantization 'pq': use int8 or binary" in bad.output
    assert not (tmp_path / "bad").exists()


def test_deploy_compose_describes_a_three_node_cluster():
    compose = yaml.safe_load((REPO / "deploy" / "qdrant-cluster" / "docker-compose.yml").read_text())
    nodes = compose["services"]
    assert sorted(nodes) == ["qdrant-1", "qdrant-2", "qdrant-3"]
    assert all(n["environment"]["QDRANT__CLUSTER__ENABLED"] == "true" for n in nodes.values())
    assert "--bootstrap" not in nodes["qdrant-1"]["command"]
    assert all("--bootstrap http://qdrant-1:6335" in nodes[n]["command"] for n in ("qdrant-2", "qdrant-3"))
    readme = (REPO / "deploy" / "qdrant-cluster" / "README.md").read_text()
    help_text = CliRunner().invoke(app, ["index", "--help"], terminal_width=200).output
    for option in ("--qdrant-shards", "--qdrant-replicas", "--qdrant-on-disk", "--qdrant-quantization"):
        assert option in readme and option in help_text
