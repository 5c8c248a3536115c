"""Generative retriever job: data formats, semantic IDs, training, artifact round trip, the entrypoint."""

import json
from dataclasses import replace
from types import SimpleNamespace

import numpy as np
import pytest
import torch

import training.retrieval.generative
import training.retrieval.pipeline
import training.retrieval.semantic_ids
from config.schema import RetrievalConfig
from ray_jobs import train_retriever as train_retriever_job
from training.artifact import load_artifact, save_artifact
from training.retrieval.data import (
    leave_one_out,
    load_sequences,
    prefix_samples,
    read_attributes,
    sequences_from_interactions,
)
from training.retrieval.generative import RetrieverTrainConfig, build_nezha, evaluate_decoder, train_retriever
from training.retrieval.pipeline import RunOptions
from training.retrieval.semantic_ids import attribute_embeddings, build_semantic_ids


@pytest.fixture(autouse=True)
def one_thread():
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


def _ring_split(users=40, items=12, length=9):
    """Every user walks a ring of items from a user-specific start: the next item is predictable."""
    u = np.repeat(np.arange(1, users + 1), length)
    i = (np.tile(np.arange(length), users) + u) % items + 1
    return leave_one_out(sequences_from_interactions(u, i, np.tile(np.arange(length), users)), max_len=6)


def _ring_retriever(split, d_model: int, **kwargs):
    """A NEZHA retriever over random 2-level semantic IDs of the ring's items."""
    sid = build_semantic_ids(torch.randn(split.num_items + 1, 4, generator=torch.Generator().manual_seed(1)),
                             codebook_sizes=(4, 4), iters=3)
    return build_nezha(split.num_items, sid, d_model=d_model, num_blocks=1, num_heads=1, max_history=5, dropout=0.0,
                       **kwargs)[0]


def test_formats_read_the_same_sequences(tmp_path):
    (tmp_path / "Toy.txt").write_text("1 5 6 7\n2 6 7 5 8\n")
    (tmp_path / "Toy_item2attributes.json").write_text(json.dumps({"5": [1], "6": [1, 2], "7": [3], "8": []}))
    (tmp_path / "Toy.inter.json").write_text(json.dumps({"0": [4, 5, 6], "1": [5, 6, 4, 7]}))
    txt, letter = load_sequences(str(tmp_path / "Toy.txt")), load_sequences(str(tmp_path / "Toy.inter.json"))
    assert [s.tolist() for s in txt.items] == [s.tolist() for s in letter.items] == [[1, 2, 3], [2, 3, 1, 4]]
    assert txt.item_vocab[1:].tolist() == [5, 6, 7, 8] and letter.item_vocab[1:].tolist() == [4, 5, 6, 7]
    attrs = read_attributes(str(tmp_path / "Toy.txt"), tmp_path, txt.item_vocab)
    assert attrs == [[], [1], [1, 2], [3], []]
    emb = attribute_embeddings(attrs, dim=4)
    assert emb.shape == (5, 4) and torch.equal(emb[0], torch.zeros(4))
    assert read_attributes(str(tmp_path / "Toy.inter.json"), tmp_path, letter.item_vocab) is None
    with pytest.raises(FileNotFoundError):
        load_sequences(str(tmp_path / "missing.txt"))


def test_prefix_samples_cover_every_next_item():
    split = _ring_split(users=3, length=5)
    s = prefix_samples(split.train, max_history=2)
    expected = []
    for row, n in zip(split.train.items, split.train.lengths):
        seq = row[:n].tolist()
        expected += [(seq[max(t - 2, 0): t], seq[t]) for t in range(1, n)]
    got = [(items[:n].tolist(), int(target)) for items, n, target in zip(s.items, s.lengths, s.targets)]
    assert got == expected


def test_semantic_ids_unique_and_rqvae_option():
    emb = torch.randn(61, 6, generator=torch.Generator().manual_seed(0))
    for method in ("rq-kmeans", "rq-vae"):
        sid = build_semantic_ids(emb, method, codebook_sizes=(4, 4), iters=3, vae_epochs=1)
        full = sid.table[1:]
        assert sid.stats["unique"] and len(torch.unique(full, dim=0)) == 60 and sid.table.shape[1] == 3
        assert sid.radices[-1] == int(full[:, -1].max()) + 1
        # RQ-KMeans keeps its centroids (the retriever's warm start); RQ-VAE's live in its latent space
        assert ([tuple(b.shape) for b in sid.codebooks] == [(4, 6), (4, 6)] if method == "rq-kmeans"
                else sid.codebooks is None)
    balanced = build_semantic_ids(emb, codebook_sizes=(4, 4), balanced=True, iters=3)
    assert int(torch.bincount(balanced.table[1:, 0]).max()) <= 15


def test_training_learns_a_predictable_sequence_and_verifies():
    split = _ring_split()
    model = _ring_retriever(split, 32, beam_size=6)
    cfg = RetrieverTrainConfig(batch_size=32, lr=5e-3, max_epochs=25, patience=25, eval_users=40,
                               test_decoders=("nezha_step", "beam_step", "nezha_end", "beam_end"))
    result = train_retriever(model, split, cfg)
    assert result.history[-1]["loss_nezha"] < result.history[0]["loss_nezha"] / 2
    for decoder, m in result.test.items():
        assert m["returned_invalid"] == 0
        if decoder.endswith("step"):
            assert m["invalid_rate"] == 0 and m["r10"] >= 0.9, (decoder, m)


def test_refit_on_validation_items_and_the_published_protocol():
    split = _ring_split()
    model = _ring_retriever(split, 16, beam_size=4)
    cfg = RetrieverTrainConfig(batch_size=32, lr=5e-3, max_epochs=4, patience=4, eval_users=40,
                               refit_with_validation=True)
    result = train_retriever(model, split, cfg)
    assert result.refit["epochs"] == result.best_epoch >= 1
    assert set(result.refit["selected_test"]) == {"nezha_step"}
    protocol = result.test["nezha_step"]["seen_excluded"]
    assert protocol["users"] == len(split.test) and protocol["returned_invalid"] == 0  # no ring target repeats
    # a user whose target is one of their earlier items is not counted under the published protocol
    test = split.test.select(np.arange(6))
    test.targets[0] = test.seen[0, 0]
    assert evaluate_decoder(model, test, seen_excluded=True)["users"] == 5
    with pytest.raises(ValueError, match="seen_excluded needs"):
        evaluate_decoder(model, split.train.select(np.arange(3)), seen_excluded=True)


def test_distillation_from_a_dense_teacher():
    from training.retrieval.dense import build_retrieval_model
    from training.retrieval.generative import code_distributions

    split = _ring_split()
    model = _ring_retriever(split, 16)
    hist, lengths, target = torch.tensor([[1, 2, 3], [4, 5, 0]]), torch.tensor([3, 2]), torch.tensor([4, 6])
    # a teacher sure of the true item teaches exactly the hard labels
    sure = torch.nn.functional.one_hot(target, split.num_items + 1).float()
    soft = code_distributions(sure, model.semantic_ids, model.semantic_ids[target], list(model.cfg.codebook_sizes))
    hard, mixed = model.losses(hist, lengths, target), model.losses(hist, lengths, target, soft, 0.7)
    assert all(torch.allclose(hard[key], mixed[key], atol=1e-5) for key in hard)
    # a uniform teacher pulls away from them; every distribution sums to one
    uniform = torch.ones(2, split.num_items + 1)
    uniform[:, 0] = 0
    uniform /= uniform.sum(1, keepdim=True)
    soft = code_distributions(uniform, model.semantic_ids, model.semantic_ids[target], list(model.cfg.codebook_sizes))
    assert all(torch.allclose(d.sum(1), torch.ones(2)) for d in soft)
    assert model.losses(hist, lengths, target, soft, 0.7)["nezha"] != hard["nezha"]
    teacher, _ = build_retrieval_model("sasrec", split.num_items, d_model=8, max_len=6, dropout=0.0)
    result = train_retriever(model, split, RetrieverTrainConfig(batch_size=32, max_epochs=1, eval_users=10,
                                                                distill_weight=0.5), teacher=teacher)
    assert result.epochs == 1 and np.isfinite(result.history[0]["loss"])


def test_entrypoint_writes_an_artifact_that_retrieves_after_loading(tmp_path):
    lines = [" ".join(map(str, [u, *((np.arange(7) + u) % 11 + 101)])) for u in range(1, 31)]
    (tmp_path / "Ring.txt").write_text("\n".join(lines) + "\n")
    out = tmp_path / "artifacts"
    rc = train_retriever_job.main(["--dataset", str(tmp_path / "Ring.txt"), "--out", str(out), "--set",
                               "retrieval.generative.codebooks=[4,4]", "--set", "retrieval.dense.max_epochs=1",
                               "--set", "retrieval.dense.d_model=8", "--set", "retrieval.generative.max_epochs=1",
                               "--set", "retrieval.generative.d_model=16", "--set", "retrieval.generative.blocks=1",
                               "--set", "retrieval.max_history=5", "--set", "retrieval.generative.eval_users=10"])
    assert rc == 0
    folder = next(out.iterdir())
    model, manifest = load_artifact(folder)
    meta = manifest.metadata
    assert meta["item_ids"] == list(range(101, 112)) and meta["dataset"].endswith("Ring.txt")
    assert manifest.semantic_ids is not None and torch.equal(manifest.semantic_ids, model.semantic_ids)
    hist, lengths = torch.tensor([[1, 2, 3], [4, 0, 0]]), torch.tensor([3, 1])
    for decoder in ("nezha", "beam"):
        items, scores = model.retrieve(hist, lengths, k=5, decoder=decoder, exclude=[{1, 2}, set()])
        assert items.shape == scores.shape == (2, 5)
        assert not {1, 2} & set(items[0].tolist()) and (items[items > 0] <= 11).all()
    # the hash sets come from the loaded table: a fresh model given the artifact's table decodes the same
    fresh, _ = load_artifact(folder)
    fresh.set_semantic_ids(manifest.semantic_ids)
    assert torch.equal(fresh.retrieve(hist, lengths, k=5)[0], model.retrieve(hist, lengths, k=5)[0])


def _ring_artifacts(tmp_path) -> dict:
    """A tiny ring dataset at tmp_path / Ring.txt and the pipeline's run on it, saved as tmp_path / nezha (the
    retriever) and tmp_path / dense (the dense retriever it trained); returns the run."""
    lines = [" ".join(map(str, [u, *((np.arange(7) + u) % 11 + 101)])) for u in range(1, 31)]
    (tmp_path / "Ring.txt").write_text("\n".join(lines) + "\n")
    cfg = RetrievalConfig(max_history=5, dense={"max_epochs": 1, "d_model": 16},
                          generative={"codebooks": [4, 4], "blocks": 1, "d_model": 16, "max_epochs": 1,
                                      "eval_users": 10})
    out = training.retrieval.pipeline.run(cfg, RunOptions(dataset=str(tmp_path / "Ring.txt"), threads=None))
    training.retrieval.pipeline.save(tmp_path / "nezha", out, dense_folder=tmp_path / "dense")
    return out


def test_pipeline_saves_the_dense_retriever_it_trained_as_serving_dense_channel(tmp_path):
    from serving.retriever import RetrievalChannels

    out = _ring_artifacts(tmp_path)  # tmp_path / Ring.txt, tmp_path / nezha, tmp_path / dense
    dense, manifest = load_artifact(tmp_path / "dense")
    assert type(dense).__name__ == "SASRec" and manifest.metadata["item_vocab"][1:] == list(range(101, 112))
    assert manifest.metrics["test"]["hr@10"] == out["dense_result"]["test"]["hr@10"]
    channels = RetrievalChannels(str(tmp_path / "nezha"), str(tmp_path / "dense"))
    history = [[(101, 0), (102, 1000)]]
    got = channels.retrieve([history[0]], [2000], [4], [set()])[0]
    assert set(got) == {"generative", "dense"} and all(len(items) == 4 for items, _ in got.values())
    assert all(101 <= i <= 111 for items, _ in got.values() for i in items)


def test_pipeline_selects_on_the_dense_models_selected_weights_and_refits_on_its_final_ones(tmp_path, monkeypatch):
    """The dense model was refitted on the validation items, so validation selects a NEZHA built from, and taught by,
    its selected weights; the refit trains one built from the final weights, which the run keeps. The same holds
    when the dense model is loaded from its artifact."""
    out = _ring_artifacts(tmp_path)
    assert out["result"].refit["selection_teacher"] == "selected"
    dense_final, _ = load_artifact(tmp_path / "dense")
    dense_selected, _ = load_artifact(tmp_path / "dense", weights="selected")
    seen = {}

    def capture(model, split, cfg, teacher=None, refit=None):
        seen.update(model=model, teacher=teacher, refit=refit)
        return SimpleNamespace(refit={"epochs": 1})

    monkeypatch.setattr(training.retrieval.pipeline, "train_retriever", capture)
    cfg = RetrievalConfig(max_history=5, generative={"codebooks": [4, 4], "blocks": 1, "d_model": 16})
    opts = RunOptions(dataset=str(tmp_path / "Ring.txt"), item_model=str(tmp_path / "dense"), threads=None)
    run = training.retrieval.pipeline.run(cfg, opts)
    teacher, (refit_model, refit_teacher) = seen["teacher"], seen["refit"]
    assert all(torch.equal(v, dense_selected.state_dict()[k]) for k, v in teacher.state_dict().items())
    assert all(torch.equal(v, dense_final.state_dict()[k]) for k, v in refit_teacher.state_dict().items())
    assert run["model"] is refit_model is not seen["model"] and torch.equal(run["sid"].table, refit_model.semantic_ids)
    sid_of = training.retrieval.pipeline._nezha(cfg, opts, 11, dense_selected, None)[2]
    assert torch.equal(seen["model"].semantic_ids, sid_of.table)
    # a dense model kept without selected weights: one model, selected and refitted, its teacher the final one
    save_artifact(tmp_path / "plain", dense_final, load_artifact(tmp_path / "dense")[1].config)
    run = training.retrieval.pipeline.run(cfg, replace(opts, item_model=str(tmp_path / "plain")))
    assert seen["refit"] is None and run["model"] is seen["model"]


def test_pipeline_starts_the_retriever_at_the_centroids_when_they_fit(tmp_path, monkeypatch, caplog):
    lines = [" ".join(map(str, [u, *((np.arange(7) + u) % 11 + 101)])) for u in range(1, 31)]
    (tmp_path / "Ring.txt").write_text("\n".join(lines) + "\n")
    seen = {}

    def capture(model, split, cfg, teacher=None, refit=None):  # the model as training would receive it
        seen["code_emb"] = model.code_emb[0].weight.detach().clone()
        return SimpleNamespace(refit={})  # nothing refitted: the pipeline keeps the model it selected

    monkeypatch.setattr(training.retrieval.pipeline, "train_retriever", capture)
    opts = RunOptions(dataset=str(tmp_path / "Ring.txt"), threads=None)
    cfg = RetrievalConfig(max_history=5, dense={"max_epochs": 1, "d_model": 16},
                          generative={"codebooks": [4, 4], "blocks": 1, "d_model": 16})
    out = training.retrieval.pipeline.run(cfg, opts)
    assert torch.equal(seen["code_emb"], out["sid"].codebooks[0])
    cfg.dense.d_model = 8  # a narrower dense table is zero-padded: the same codes, centroids in the first 8 dims
    out = training.retrieval.pipeline.run(cfg, opts)
    assert out["sid"].codebooks[0].shape[1] == 16 and not out["sid"].codebooks[0][:, 8:].any()
    assert torch.equal(seen["code_emb"], out["sid"].codebooks[0])
    with caplog.at_level("WARNING"):  # RQ-VAE codes live in its latent space: no centroids to start at, said
        cfg.generative.sid_method = "rq-vae"
        out = training.retrieval.pipeline.run(cfg, opts)
    assert "init_from_codebooks skipped" in caplog.text


def test_decoder_benchmark_runs_at_a_tiny_shape(tmp_path):
    from bench import decoders

    out = tmp_path / "decoders.json"
    assert decoders.main(["--items", "300", "--codebook", "8", "--levels", "2", "--requests", "2",
                          "--sizes", "16x1", "--out", str(out)]) == 0
    record = json.loads(out.read_text())
    assert set(record["decoders"]) == {f"{d}_{check}" for d in ("nezha", "beam")
                                       for check in ("table", "probe", "per_beam_rows")} | {"nezha_prompt_pass"}
    assert record["k"] == 10 and not record["exclude_history"]
    rows, speedups = record["decoders"], record["speedups"]
    for b in (1, 32):  # the bound is beam search over NEZHA's prompt pass, timed in the same run
        bound = rows["beam_table"][f"ms_b{b}"] / rows["nezha_prompt_pass"][f"ms_b{b}"]
        assert speedups[f"bound_if_decoding_were_free_b{b}"] == pytest.approx(bound, abs=0.006)
    # NEZHA is never faster than its own prompt pass (at batch 1 by a wide margin: timing noise cannot flip it)
    assert speedups["bound_if_decoding_were_free_b1"] > speedups["nezha_vs_beam_b1"]
    (row,) = record["backbone_scaling"]
    assert row["d_model"] == 16 and row["speedup_b1"] > 0 and row["speedup_b32"] > 0
    assert row["bound_b1"] == pytest.approx(row["beam_ms_b1"] / row["prompt_ms_b1"], abs=0.006)
    # serving's shape: more items per request than the beam, each request excluding its history
    assert decoders.main(["--items", "300", "--codebook", "8", "--levels", "1", "--requests", "2", "--k", "40",
                          "--exclude-history", "--sizes", "", "--out", str(out)]) == 0
    record = json.loads(out.read_text())
    assert record["k"] == 40 and record["exclude_history"]
    assert record["speedups"]["prefix_rows_vs_per_beam_rows_nezha_b32"] > 0


def test_limits_benchmark_measures_decoding_and_codes_at_a_tiny_shape(tmp_path):
    from bench import retrieval_limits

    table = torch.stack([torch.arange(13.0), torch.zeros(13)], 1)  # item i scores i; row 0 is padding
    users = torch.tensor([[1.0, 0.0], [1.0, 0.0]])
    assert retrieval_limits.recall_at_10(users, table, torch.tensor([12, 1])) == (0.5, 0.5)  # ranks 1 and 12
    out = _ring_artifacts(tmp_path)  # tmp_path / Ring.txt, tmp_path / nezha, tmp_path / dense
    assert retrieval_limits.main(["--dataset", str(tmp_path / "Ring.txt"), "--dense", str(tmp_path / "dense"),
                                  "--nezha", str(tmp_path / "nezha"), "--widths", "2", "--users", "20",
                                  "--set", "retrieval.max_history=5", "--set", "retrieval.generative.codebooks=[4,4]",
                                  "--out", str(tmp_path / "limits.json")]) == 0
    record = json.loads((tmp_path / "limits.json").read_text())
    assert [row["beam"] for row in record["decoding"]] == [2, 11] and record["decoding"][-1]["exhaustive"]
    assert set(record["codes"]) >= {"dense", "unit_rows", "rebuilt_from_codes", "rebuilt_relative_error"}
    # the codes the benchmark rebuilt are the ones the pipeline gave the retriever (same config, same seed)
    assert record["codes"]["semantic_ids"]["radices"] == list(out["sid"].radices)
    assert 0 < record["codes"]["rebuilt_relative_error"] <= 1


def test_paired_benchmark_compares_both_models_on_the_same_users(tmp_path):
    from bench import retrieval_paired
    from training.retrieval.dense import evaluate
    from training.retrieval.generative import test_rows

    same = retrieval_paired.paired(np.array([1.0, 0.0, 1.0]), np.array([1.0, 0.0, 1.0]), 50, 0)
    assert same["difference"] == 0 and same["ci95"] == [0, 0]
    better = retrieval_paired.paired(np.ones(40), np.zeros(40), 50, 0)
    assert better["difference"] == 1 and better["ci95"] == [1, 1]
    _ring_artifacts(tmp_path)  # tmp_path / Ring.txt, tmp_path / nezha, tmp_path / dense
    assert retrieval_paired.main(["--dataset", str(tmp_path / "Ring.txt"), "--nezha", str(tmp_path / "nezha"),
                                  "--dense", str(tmp_path / "dense"), "--users", "20", "--resamples", "50",
                                  "--out", str(tmp_path / "paired.json")]) == 0
    record = json.loads((tmp_path / "paired.json").read_text())
    assert record["users"] == 20 and set(record) >= {"nothing_excluded", "seen_excluded"}
    # each side's mean is what that model's own evaluation gives on the same users
    nezha, _ = load_artifact(tmp_path / "nezha")
    dense, _ = load_artifact(tmp_path / "dense")
    split = leave_one_out(load_sequences(str(tmp_path / "Ring.txt"), str(tmp_path)), max_len=6)
    rows = test_rows(len(split.test), 20)
    row = record["nothing_excluded"]
    assert row["r10"]["nezha"] == round(evaluate_decoder(nezha, split.test, rows=rows)["r10"], 4)
    assert row["r10"]["dense"] == round(evaluate(dense, split.test.select(rows), ks=(10,))["hr@10"], 4)
    assert row["r10"]["ci95"][0] <= row["r10"]["difference"] <= row["r10"]["ci95"][1]
