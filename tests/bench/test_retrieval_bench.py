"""bench.retrieval end to end at a tiny shape: dense and generative rows, the channels' recall, the record."""

import json

import numpy as np


def test_retrieval_benchmark_writes_every_row_and_the_channels(tmp_path):
    from bench import retrieval

    lines = [" ".join(map(str, [u, *((np.arange(8) + u) % 17 + 1)])) for u in range(1, 61)]
    (tmp_path / "Ring.txt").write_text("\n".join(lines) + "\n")
    out = tmp_path / "retrieval.json"
    rc = retrieval.main(["--dataset", str(tmp_path / "Ring.txt"), "--out", str(out), "--requests", "2",
                         "--save", str(tmp_path / "saved"),
                         "--channel-users", "20", "--set", "retrieval.max_history=6",
                         "--set", "retrieval.dense.d_model=16", "--set", "retrieval.dense.max_epochs=2",
                         "--set", "retrieval.generative.d_model=16", "--set", "retrieval.generative.max_epochs=1",
                         "--set", "retrieval.generative.codebooks=[4,4]", "--set", "retrieval.generative.eval_users=10",
                         "--set", "retrieval.channels={generative: 5, dense: 4, trending: 3}"])
    assert rc == 0
    entry = json.loads(out.read_text())["Ring.txt"]
    for row in ("nezha", "beam", "nezha_end", "beam_end", "dense"):
        assert 0 <= entry[row]["r10"] <= 1 and entry[row]["latency_ms_b1"] > 0
    channels = entry["channels"]
    assert channels["users"] == 20 and channels["quotas"] == {"generative": 5, "dense": 4, "trending": 3}
    assert set(channels["recall"]) == {"generative", "dense", "trending", "merged"}
    # 17 items and k = 200: every channel that lists the whole catalogue finds every target
    assert channels["recall"]["dense"] == channels["recall"]["trending"] == channels["recall"]["merged"] == 1.0
    assert set(channels["latency_ms_b1"]) == {"generative", "dense", "all_channels"}
    assert channels["latency_ms_b1"]["all_channels"] >= channels["latency_ms_b1"]["generative"] > 0
    assert entry["config"]["dense"]["max_epochs"] == 2 and entry["dense_train"]["epochs"] == 2
    # --save keeps the benchmarked NEZHA: it loads, and its recorded test figure is the row's
    from training.artifact import load_artifact

    model, manifest = load_artifact(entry["artifact"])
    assert type(model).__name__ == "NezhaRetriever"
    assert manifest.metrics["test"]["nezha_step"]["r10"] == entry["nezha"]["r10"]
