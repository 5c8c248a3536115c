"""Retrieval data (readers, leave-one-out) and training (loss falls, a learnable pattern is learned)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from training.retrieval.data import (
    leave_one_out,
    load_sequences,
    read_inter_json,
    read_movielens_dat,
    read_s3rec_txt,
    sequences_from_interactions,
)
from training.retrieval.dense import (
    RetrievalTrainConfig,
    build_retrieval_model,
    evaluate,
    score_next_items,
    train_retrieval,
)
from training.retrieval.loop import epoch_batches
from training.retrieval.losses import full_softmax, per_sequence_sampled_softmax


def test_movielens_reader_sorts_by_time_and_keeps_file_order_on_ties(tmp_path):
    path = tmp_path / "ratings.dat"
    path.write_text("2::50::3::100\n1::30::5::20\n1::10::4::10\n1::40::1::20\n2::10::2::90\n")
    data = read_movielens_dat(path)
    assert data.user_ids.tolist() == [1, 2]
    assert data.item_vocab.tolist() == [0, 10, 30, 40, 50]
    assert [data.item_vocab[s].tolist() for s in data.items] == [[10, 30, 40], [10, 50]]
    assert [t.tolist() for t in data.times] == [[10, 20, 20], [90, 100]]


def test_s3rec_reader_keeps_dense_ids_and_uses_ordinal_times(tmp_path):
    path = tmp_path / "Toy.txt"
    path.write_text("1 1 2 3\n2 4 2\n\n")
    data = read_s3rec_txt(path)
    assert [s.tolist() for s in data.items] == [[1, 2, 3], [4, 2]]
    assert [t.tolist() for t in data.times] == [[0, 1, 2], [0, 1]]
    assert data.num_items == 4 and data.num_interactions == 5


def test_inter_json_reader_and_its_errors(tmp_path):
    path = tmp_path / "Toy.inter.json"
    path.write_text('{"0": [3, 0, 5], "1": [5, 3], "2": []}')
    data = load_sequences(str(path))
    assert data.user_ids.tolist() == [0, 1] and data.item_vocab.tolist() == [0, 0, 3, 5]
    assert [data.item_vocab[s].tolist() for s in data.items] == [[3, 0, 5], [5, 3]]
    assert [t.tolist() for t in data.times] == [[0, 1, 2], [0, 1]]
    bad = tmp_path / "Bad.inter.json"
    bad.write_text('[[1, 2]]')
    with pytest.raises(ValueError, match=r"Bad\.inter\.json: expected a JSON object"):
        read_inter_json(bad)


def test_nezha_beauty_is_amazon_beauty_with_ids_minus_one():
    root = Path(__file__).resolve().parents[3] / "shared" / "datasets"
    if not (root / "nezha" / "Beauty" / "Beauty.inter.json").exists() or not (root / "amazon" / "Beauty.txt").exists():
        pytest.skip(f"needs {root}/nezha/Beauty/Beauty.inter.json and {root}/amazon/Beauty.txt")
    nezha = read_inter_json(root / "nezha" / "Beauty" / "Beauty.inter.json")
    amazon = load_sequences("beauty", root)
    assert nezha.num_interactions == amazon.num_interactions and len(nezha.items) == len(amazon.items)
    by_user = {int(u): amazon.item_vocab[s] for u, s in zip(amazon.user_ids, amazon.items, strict=True)}
    for u, s in zip(nezha.user_ids[:500], nezha.items[:500], strict=True):
        assert (nezha.item_vocab[s] + 1).tolist() == by_user[int(u) + 1].tolist()


def test_missing_dataset_names_the_paths_it_looked_for(tmp_path):
    with pytest.raises(FileNotFoundError, match=r"ratings_users_1-2999\.dat"):
        load_sequences("ml-1m", tmp_path)


@settings(max_examples=30, deadline=None)
@given(lengths=st.lists(st.integers(1, 12), min_size=1, max_size=8), max_len=st.integers(2, 6))
def test_leave_one_out(lengths, max_len):
    rng = np.random.default_rng(sum(lengths) + max_len)
    users = np.repeat(np.arange(1, len(lengths) + 1), lengths)
    times = np.concatenate([np.sort(rng.integers(0, 1000, n)) for n in lengths])
    data = sequences_from_interactions(users, rng.integers(1, 30, len(users)), times)
    split = leave_one_out(data, max_len=max_len)
    kept = [i for i, s in enumerate(data.items) if len(s) >= 3]
    assert split.skipped_users == len(lengths) - len(kept)
    assert split.num_items == data.num_items
    for row, u in enumerate(kept):
        seq, ts = data.items[u], data.times[u]
        n = split.train.lengths[row]
        assert split.train.items[row, :n].tolist() == seq[:-2][-max_len:].tolist()
        assert split.train.times[row, :n].tolist() == ts[:-2][-max_len:].tolist()
        assert (split.train.items[row, n:] == 0).all()
        for part, cut in ((split.valid, 2), (split.test, 1)):
            m = part.lengths[row]
            assert m <= max_len and part.targets[row] == seq[-cut]
            assert part.items[row, : m - 1].tolist() == seq[:-cut][-(max_len - 1):].tolist()
            assert part.items[row, m - 1] == 0 and part.times[row, m - 1] == ts[-cut]  # the target's slot
            seen = part.seen[row]
            assert seen[: len(seq) - cut].tolist() == seq[:-cut].tolist() and (seen[len(seq) - cut:] == 0).all()
        # the test history is the validation history moved on by one item (until max_len cuts it)
        assert split.test.items[row, split.test.lengths[row] - 2] == seq[-2]


def test_seen_excluded_removes_each_users_earlier_items_and_users_whose_target_repeats_one():
    # User u's sequence: random items, and every third user's target repeats an earlier item.
    rng = np.random.default_rng(3)
    seqs = [rng.permutation(np.arange(1, 31))[: rng.integers(4, 30)] for _ in range(60)]
    for u in range(0, 60, 3):
        seqs[u][-1] = seqs[u][0]
    users = np.repeat(np.arange(60), [len(s) for s in seqs])
    data = sequences_from_interactions(users, np.concatenate(seqs), np.concatenate([np.arange(len(s)) for s in seqs]))
    split = leave_one_out(data, max_len=6)  # histories of 5 items: `seen` must reach further back
    model, _ = build_retrieval_model("sasrec", split.num_items, d_model=8, max_len=6, dropout=0.0)
    test = split.test
    scores = score_next_items(model, *(torch.from_numpy(a) for a in (test.items, test.times, test.lengths))).numpy()
    expected = []
    for row, seq in enumerate(data.items):
        earlier = set(seq[:-1].tolist())
        if seq[-1] in earlier:
            continue
        others = np.delete(np.arange(1, split.num_items + 1), sorted(earlier | {int(seq[-1])}) - np.int64(1))
        expected.append(int((scores[row, others] >= scores[row, seq[-1]]).sum()))
    got = evaluate(model, test, ks=(10,), seen_excluded=True)
    assert got["users"] == 40 == len(expected)
    assert got["hr@10"] == pytest.approx(np.mean(np.array(expected) < 10))
    assert got["mrr"] == pytest.approx(np.mean(1.0 / (np.array(expected) + 1)), rel=1e-5)
    assert evaluate(model, test, ks=(10,))["mrr"] < got["mrr"]  # earlier items no longer compete
    with pytest.raises(ValueError, match="seen_excluded needs"):
        evaluate(model, split.train.select(np.arange(3)), seen_excluded=True)


def test_ml1m_sequences_and_split(datasets_dir):
    data = load_sequences("ml-1m", datasets_dir)
    assert (len(data.items), data.num_items, data.num_interactions) == (2999, 3615, 487_650)  # datasets README
    assert all((np.diff(t) >= 0).all() for t in data.times)
    split = leave_one_out(data, max_len=200)
    assert split.skipped_users == 0 and split.train.lengths.max() == 200 and split.test.lengths.max() == 200


@given(st.lists(st.integers(1, 40), min_size=1, max_size=200), st.integers(1, 17), st.booleans())
@settings(max_examples=50, deadline=None)
def test_epoch_batches_cover_every_row_once(lengths, batch_size, bucketing):
    batches = epoch_batches(np.array(lengths), batch_size, np.random.default_rng(0), bucketing)
    assert all(0 < len(b) <= batch_size for b in batches)
    assert sorted(np.concatenate(batches).tolist()) == list(range(len(lengths)))


def ring_split(num_users=128, length=14, num_items=60, max_len=12):
    """Each user walks 1..num_items in steps of +1 from a random start: the next item is always predictable."""
    rng = np.random.default_rng(0)
    starts = rng.integers(0, num_items, num_users)
    users = np.repeat(np.arange(1, num_users + 1), length)
    items = (starts[:, None] + np.arange(length)[None, :]).reshape(-1) % num_items + 1
    times = np.tile(np.arange(length) * 60, num_users)
    return leave_one_out(sequences_from_interactions(users, items, times), max_len=max_len)


@pytest.mark.parametrize(("kind", "softmax"), [("hstu", "full"), ("sasrec", "full"), ("sasrec", "sampled_per_sequence"),
                                               ("hstu", "sampled_per_batch")])
def test_training_learns_a_strong_pattern(kind, softmax):
    split = ring_split()
    model, _ = build_retrieval_model(kind, split.num_items, d_model=16, num_heads=1, max_len=12, dropout=0.0)
    before = evaluate(model, split.test)
    cfg = RetrievalTrainConfig(batch_size=16, lr=5e-3, num_negatives=16, softmax=softmax, max_epochs=15,
                               patience=3)
    result = train_retrieval(model, split, cfg)
    losses = [row["loss"] for row in result.history]
    assert losses[-1] < 0.5 * losses[0]
    assert result.test["hr@10"] > 0.9 > 3 * before["hr@10"]  # random: 10 / 60
    best = max(result.history, key=lambda row: (row["valid_hr@10"], row["valid_ndcg@10"]))
    assert result.best_epoch == best["epoch"] and result.valid["hr@10"] == best["valid_hr@10"]


def test_training_is_deterministic_by_seed():
    split = ring_split(num_users=16, length=8)
    runs = []
    for _ in range(2):
        model, _ = build_retrieval_model("hstu", split.num_items, d_model=8, max_len=12, dropout=0.2, seed=5)
        result = train_retrieval(model, split, RetrievalTrainConfig(batch_size=8, num_negatives=8, max_epochs=2))
        runs.append(([row["loss"] for row in result.history], result.test, model.state_dict()))
    assert runs[0][0] == runs[1][0] and runs[0][1] == runs[1][1]
    assert all(torch.equal(runs[0][2][k], runs[1][2][k]) for k in runs[0][2])


def test_the_target_slot_lends_its_time_but_not_its_item():
    split = ring_split(num_users=4)
    hstu, _ = build_retrieval_model("hstu", split.num_items, d_model=8, max_len=12, dropout=0.0)
    sasrec, _ = build_retrieval_model("sasrec", split.num_items, d_model=8, max_len=12, dropout=0.0)
    items, times, lengths = (torch.from_numpy(a) for a in (split.test.items, split.test.times, split.test.lengths))
    last = (torch.arange(4), lengths - 1)
    other_item, later = items.clone(), times.clone()
    other_item[last] = 7
    later[last] += 10**6
    for model in (hstu.eval(), sasrec.eval()):
        assert torch.equal(score_next_items(model, items, times, lengths),
                           score_next_items(model, other_item, times, lengths))
    assert not torch.allclose(score_next_items(hstu, items, times, lengths),
                              score_next_items(hstu, items, later, lengths))
    # SASRec ignores time: its scores are those of the history alone
    scores = score_next_items(sasrec, items, times, lengths)
    expected = sasrec.score_all(items, times, lengths - 1)
    torch.testing.assert_close(scores[:, 1:], expected[:, 1:])


def test_per_sequence_loss_matches_the_formula_and_masks_accidental_hits():
    model, _ = build_retrieval_model("hstu", num_items=12, d_model=8, max_len=10, dropout=0.0)
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(1, 13, (3, 10), generator=g)
    ts = torch.cumsum(torch.randint(1, 100, (3, 10), generator=g), 1)
    lengths = torch.tensor([10, 4, 7])
    loss = per_sequence_sampled_softmax(model, ids, ts, lengths, num_negatives=6,
                                        generator=torch.Generator().manual_seed(1))
    neg = torch.randint(1, 13, (3, 6), generator=torch.Generator().manual_seed(1))
    out, table = model(ids, ts, lengths), model.item_embeddings()
    terms = []
    for r in range(3):
        for i in range(int(lengths[r]) - 1):
            t = int(ids[r, i + 1])
            logits = [out[r, i] @ table[t]] + [out[r, i] @ table[k] for k in neg[r].tolist() if k != t]
            terms.append(-torch.log_softmax(torch.stack(logits) / 0.05, 0)[0])
    torch.testing.assert_close(loss, torch.stack(terms).mean())
    one, _ = build_retrieval_model("sasrec", num_items=1, d_model=8, max_len=10)
    assert per_sequence_sampled_softmax(one, (ids > 0).long(), None, lengths, 8).item() == pytest.approx(0, abs=1e-6)


def test_full_softmax_is_cross_entropy_over_every_item_but_padding():
    model, _ = build_retrieval_model("sasrec", num_items=12, d_model=8, max_len=10, dropout=0.0)
    ids = torch.randint(1, 13, (3, 10), generator=torch.Generator().manual_seed(0))
    lengths = torch.tensor([10, 4, 7])
    out, table = model(ids, None, lengths), model.item_embeddings()
    terms = []
    for r in range(3):
        for i in range(int(lengths[r]) - 1):
            logits = out[r, i] @ table[1:].T / model.temperature
            terms.append(torch.logsumexp(logits, 0) - logits[int(ids[r, i + 1]) - 1])
    torch.testing.assert_close(full_softmax(model, ids, None, lengths), torch.stack(terms).mean())


def test_config_rejects_an_unknown_softmax():
    with pytest.raises(ValueError, match="softmax"):
        RetrievalTrainConfig(softmax="position")


def test_dense_entrypoint_trains_the_configured_recipe_and_saves_a_loadable_artifact(tmp_path):
    from ray_jobs import train_retrieval as job
    from training.artifact import load_artifact

    lines = [" ".join(map(str, [u, *((np.arange(9) + u) % 13 + 1)])) for u in range(1, 41)]
    (tmp_path / "Ring.txt").write_text("\n".join(lines) + "\n")
    rc = job.main(["--dataset", str(tmp_path / "Ring.txt"), "--out", str(tmp_path / "out"), "--threads", "1",
                   "--set", "retrieval.dense.d_model=16", "--set", "retrieval.dense.max_epochs=2",
                   "--set", "retrieval.dense.similarity=dot", "--set", "retrieval.max_history=8"])
    assert rc == 0
    model, manifest = load_artifact(next((tmp_path / "out").iterdir()))
    assert type(model).__name__ == "SASRec" and model.similarity == "dot" and model.item_emb.weight.shape == (14, 16)
    assert manifest.metadata["retrieval"]["dense"]["max_epochs"] == 2 and manifest.metrics["epochs"] == 2
    scores = model.eval().score_all(torch.tensor([[1, 2, 3]]), None, torch.tensor([3]))
    assert scores.shape == (1, 14) and scores[0, 0] == float("-inf")
    # refitted by default: the weights validation selected are kept beside the refit's
    selected, _ = load_artifact(next((tmp_path / "out").iterdir()), weights="selected")
    assert not torch.equal(selected.item_emb.weight, model.item_emb.weight)


def test_refit_trains_the_chosen_epochs_on_validation_items_and_tests_the_refit():
    split = ring_split(num_users=32, length=10)
    model, _ = build_retrieval_model("sasrec", split.num_items, d_model=16, max_len=12, dropout=0.0)
    cfg = RetrievalTrainConfig(batch_size=16, lr=5e-3, max_epochs=4, eval_every=2, refit_with_validation=True)
    result = train_retrieval(model, split, cfg)
    assert result.refit["epochs"] == result.best_epoch in (2, 4)
    assert set(result.refit["selected_test"]) == set(result.test)
    # the selected weights are kept (for the artifact), not the refit's, and stay out of the result's dict
    assert not torch.equal(result.selected_state["item_emb.weight"], model.item_emb.weight)
    assert "selected_state" not in result.to_dict()
    extended = split.train_with_validation()
    assert (extended.lengths == np.minimum(split.train.lengths + 1, split.max_len)).all()
    last = extended.items[np.arange(len(extended)), extended.lengths - 1]
    assert (last == split.valid.targets).all()  # the validation item, never the test item
