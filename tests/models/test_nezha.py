"""NEZHA generative retriever: backbone cache, draft head, teacher forcing, verified decoders, hand beams."""

import itertools

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st

from models import nezha, nezha_backbone
from models.nezha import NezhaConfig, NezhaRetriever, recent
from models.nezha_backbone import CausalBackbone

RADICES = (4, 3, 2)


def _table(num_items: int, seed: int = 0) -> torch.Tensor:
    """Distinct random tuples over RADICES for items 1..num_items (row 0 = padding)."""
    g = torch.Generator().manual_seed(seed)
    tuples = torch.tensor(list(itertools.product(*(range(t) for t in RADICES))))
    pick = tuples[torch.randperm(len(tuples), generator=g)[:num_items]]
    return torch.cat([torch.zeros(1, len(RADICES), dtype=torch.long), pick])


def _model(backbone="hstu", num_items=15, **kw) -> NezhaRetriever:
    torch.manual_seed(0)
    cfg = NezhaConfig(num_items=num_items, codebook_sizes=RADICES, backbone=backbone, d_model=16, num_blocks=2,
                      num_heads=2, max_history=6, dropout=0.0, beam_size=5, **kw)
    model = NezhaRetriever(cfg)
    model.set_semantic_ids(_table(num_items))
    return model.eval()


@pytest.mark.parametrize("kind", ["hstu", "transformer"])
def test_cached_steps_equal_full_recompute(kind):
    torch.manual_seed(0)
    bb = CausalBackbone(kind, d_model=16, num_blocks=2, num_heads=2, max_len=12, dropout=0.0).eval()
    x, lengths = torch.randn(3, 9, 16), torch.tensor([5, 3, 4])
    full = bb(x, lengths + 3)  # the three tokens after each row's prompt are decoded one at a time below
    prompt = x * (torch.arange(9)[None, :] < lengths[:, None])[..., None]
    _, cache = bb.prefill(prompt[:, :5], lengths)
    rows = torch.arange(3)
    for j in range(3):
        out, cache = bb.step(x[rows, lengths + j][:, None], cache)
        torch.testing.assert_close(out[:, 0], full[rows, lengths + j], atol=1e-5, rtol=1e-4)


@pytest.mark.parametrize("kind", ["hstu", "transformer"])
@pytest.mark.parametrize("rows, copy_up_to, layout", [([0, 0, 0, 1, 1, 1], 0, "prompt"),
                                                      ([0, 0, 0, 1, 1, 1], 10**9, "kv"), ([1, 0, 1, 1], 0, "kv")],
                         ids=["beams_sharing_prompts", "beams_copying_prompts", "any_order"])
def test_cached_steps_after_reordering_equal_full_recompute(kind, rows, copy_up_to, layout, monkeypatch):
    """Rows that continue a prompt (as beams do), each with its own generated tokens, in beam search's layout (W per
    request, in order; the prompts shared or, below the size where sharing pays, copied) or in any order (copied)."""
    monkeypatch.setattr(nezha_backbone, "_COPY_PROMPTS_UP_TO", copy_up_to)
    torch.manual_seed(1)
    bb = CausalBackbone(kind, d_model=16, num_blocks=2, num_heads=2, max_len=12, dropout=0.0).eval()
    lengths, rows = torch.tensor([5, 3]), torch.tensor(rows)
    prompt = torch.randn(2, 5, 16) * (torch.arange(5)[None, :] < lengths[:, None])[..., None]
    _, cache = bb.prefill(prompt, lengths)
    cache = bb.reorder(cache, rows)
    assert layout in cache
    tails = torch.randn(len(rows), 3, 16)  # each row's own generated tokens
    for j in range(3):
        out, cache = bb.step(tails[:, j][:, None], cache)
        for r, req in enumerate(rows.tolist()):
            n = int(lengths[req])
            seq = torch.cat([prompt[req, :n], tails[r, : j + 1]])[None]
            full = bb(seq, torch.tensor([n + j + 1]))
            torch.testing.assert_close(out[r, 0], full[0, -1], atol=1e-5, rtol=1e-4)
        if j == 0:
            cache = bb.reorder(cache, torch.arange(len(rows)))  # a reorder between steps keeps each row's tokens


@pytest.mark.parametrize("kind", ["hstu", "transformer"])
def test_backbone_is_causal(kind):
    torch.manual_seed(0)
    bb = CausalBackbone(kind, d_model=16, num_blocks=2, num_heads=2, max_len=10, dropout=0.0).eval()
    x = torch.randn(1, 8, 16)
    y = x.clone()
    y[0, 5] += torch.randn(16)
    a, b = bb(x, torch.tensor([8])), bb(y, torch.tensor([8]))
    assert torch.allclose(a[0, :5], b[0, :5], atol=1e-6) and not torch.allclose(a[0, 5:], b[0, 5:])


@pytest.mark.parametrize("cell", ["rnn", "gru"])
def test_draft_head_shapes_and_teacher_forcing(cell):
    model = _model(draft_cell=cell)
    h0, hs = torch.randn(4, 16), torch.randn(4, 3, 16)
    codes = torch.tensor([[0, 1, 1], [3, 2, 0], [1, 0, 1], [2, 2, 1]])
    logits = model.draft_logits(h0, hs, codes)
    assert [tuple(lg.shape) for lg in logits] == [(4, 4), (4, 3), (4, 2)]
    other = codes.clone()
    other[:, 1] = (other[:, 1] + 1) % 3  # change the true level-2 code: levels 1-2 unchanged, level 3 changes
    changed = model.draft_logits(h0, hs, other)
    assert torch.equal(logits[0], changed[0]) and torch.equal(logits[1], changed[1])
    assert not torch.allclose(logits[2], changed[2])


@pytest.mark.parametrize("cell, item_head", [("rnn", False), ("gru", False), ("gru", True)])
def test_draft_decoding_steps_equal_the_teacher_forced_draft_head(cell, item_head):
    model = _model(draft_cell=cell, item_head=item_head)
    assert isinstance(model.draft_rnn[0], {"rnn": nn.RNNCell, "gru": nn.GRUCell}[cell])
    hist, lengths, target = torch.tensor([[1, 2, 3, 0], [4, 5, 0, 0]]), torch.tensor([3, 2]), torch.tensor([6, 7])
    codes = model.semantic_ids[target]
    with torch.no_grad():
        hx = model.item_tokens(hist)
        states = model._at(model._run(hx, lengths, model.placeholders[None]), lengths, model.levels + 1)
        forced = [F.log_softmax(lg, -1) for lg in model.draft_logits(states[:, 0], states[:, 1:], codes)]
        first, step = model._nezha_start(hx, lengths)
        torch.testing.assert_close(first, forced[0])
        for level in (1, 2):  # each step extends the previous call's rows with the true code
            prefix = model.index().prefix_rows(codes[:, :level])
            torch.testing.assert_close(step(level, torch.arange(2), codes[:, level - 1], prefix), forced[level])


@pytest.mark.parametrize("item_head", [False, True])
def test_losses_and_lm_teacher_forcing_match_cached_decoding(item_head):
    model = _model(item_head=item_head)
    hist, lengths, target = torch.tensor([[1, 2, 3, 0], [4, 5, 0, 0]]), torch.tensor([3, 2]), torch.tensor([6, 7])
    parts = model.losses(hist, lengths, target)
    assert set(parts) == {"nezha", "lm"} and all(torch.isfinite(v) for v in parts.values())
    model.loss(hist, lengths, target).backward()
    heads = (model.item_out,) if item_head else ()
    for part in (model.draft_out, model.draft_rnn, model.lm_out, model.backbone, model.code_emb, *heads):
        assert all(p.grad is not None for p in part.parameters())
    # the LM's teacher-forced logits equal what the cached beam decoder computes step by step
    codes = model.semantic_ids[target]
    with torch.no_grad():
        hx = model.item_tokens(hist)
        states = model._at(model._run(hx, lengths, model.lm_tail(codes[:, :-1])), lengths, 3)
        forced = [F.log_softmax(model.level_logits(1, level, states[:, level], model.prefix_rows(codes)), -1)
                  for level in range(3)]
        first, step = model._beam_start(hx, lengths)
        torch.testing.assert_close(first, forced[0])
        for level in (1, 2):
            lp = step(level, torch.arange(2), codes[:, level - 1], model.index().prefix_rows(codes[:, :level]))
            torch.testing.assert_close(lp, forced[level], atol=1e-5, rtol=1e-4)


def test_item_head_scores_the_prefix_items_by_their_own_rows():
    """The last level's logit of code t is the state's dot product with the output row of the item that the prefix
    extended by t names; codes naming no item are out of reach (and carry no NaN into a soft cross-entropy)."""
    model = _model(num_items=15, item_head=True)
    assert len(model.draft_out) == len(model.lm_out) == 2  # one output row per code only below the last level
    table = torch.randn(16, 16)
    model.init_item_head(table)
    assert torch.equal(model.item_out[0].weight[1:], table[1:])
    assert torch.equal(model.item_out[1].weight[0], torch.zeros(16))
    codes = model.semantic_ids[1:]
    prefix = model.prefix_rows(codes)
    x = torch.randn(15, 16)
    for head in (0, 1):
        with torch.no_grad():
            logits = model.level_logits(head, 2, x, prefix)
        for i in range(15):
            for t in range(RADICES[2]):
                items = [j for j in range(1, 16) if model.semantic_ids[j, :2].tolist() == codes[i, :2].tolist()
                         and int(model.semantic_ids[j, 2]) == t]
                want = float(x[i] @ table[items[0]]) if items else -1e9
                assert float(logits[i, t]) == pytest.approx(want, rel=1e-5, abs=1e-4)
    soft = [torch.full((2, t), 1.0 / t) for t in RADICES]
    soft[2] = F.one_hot(codes[:2, 2], RADICES[2]).float()
    parts = model.losses(torch.tensor([[1, 2], [3, 0]]), torch.tensor([2, 1]), torch.tensor([1, 2]), soft, 0.5)
    assert all(torch.isfinite(v) for v in parts.values())
    with pytest.raises(ValueError, match="item table is"):
        model.init_item_head(torch.randn(16, 8))
    with pytest.raises(ValueError, match="no item head"):
        _model().init_item_head(table)
    with pytest.raises(ValueError, match="at least two levels"):
        NezhaRetriever(NezhaConfig(num_items=3, codebook_sizes=(4,), d_model=8, item_head=True))


def _wide_model() -> NezhaRetriever:
    """40 items under 4 prefixes of 12 codes: an item head wide enough for decoding to read a prefix's rows once."""
    torch.manual_seed(0)
    cfg = NezhaConfig(num_items=40, codebook_sizes=(4, 12), d_model=16, num_blocks=1, num_heads=2, max_history=6,
                      dropout=0.0, beam_size=5, item_head=True)
    model = NezhaRetriever(cfg)
    tuples = torch.tensor(list(itertools.product(range(4), range(12))))
    pick = tuples[torch.randperm(len(tuples), generator=torch.Generator().manual_seed(0))[:40]]
    model.set_semantic_ids(torch.cat([torch.zeros(1, 2, dtype=torch.long), pick]))
    return model.eval()


@settings(max_examples=60, deadline=None)
@given(rows=st.lists(st.integers(-1, 3), min_size=1, max_size=40), seed=st.integers(0, 1000))
def test_item_logits_read_once_per_prefix_equal_the_rows_read_per_beam(rows, seed):
    """Decoding scores each distinct prefix's items once (beams of different requests share prefixes); the logits
    must be those of the per-beam path training uses, invalid prefixes (-1) and codes naming no item included."""
    model = _wide_model()
    prefix, x = torch.tensor(rows), torch.randn(len(rows), 16, generator=torch.Generator().manual_seed(seed))
    for head in (0, 1):
        per_beam = model.level_logits(head, 1, x, prefix).detach()  # grad enabled: the per-beam path
        shared = nezha._item_logits_per_prefix(model.item_out[head], model.index(), 1, x, prefix)
        distinct = len(set(rows))
        if distinct == len(rows) or distinct * max(rows.count(r) for r in rows) > 8 * len(rows):
            assert shared is None  # nothing shared, or too little for the padding to pay
        else:
            torch.testing.assert_close(shared, per_beam)
        with torch.no_grad():
            torch.testing.assert_close(model.level_logits(head, 1, x, prefix), per_beam)
    narrow = _model(num_items=15, item_head=True)  # prefixes of 2 items: cheaper read per beam
    assert nezha._item_logits_per_prefix(narrow.item_out[0], narrow.index(), 2, x, torch.zeros(len(rows))) is None


@pytest.mark.parametrize("decoder", ["nezha", "beam"])
def test_batched_decoding_gives_the_same_beams_with_prefixes_read_per_beam(decoder, monkeypatch):
    model = _wide_model()
    g = torch.Generator().manual_seed(3)
    hist, lengths = torch.randint(1, 41, (8, 6), generator=g), torch.randint(1, 7, (8,), generator=g)
    exclude = [set(h[:n].tolist()) for h, n in zip(hist, lengths)]
    real, used = nezha._item_logits_per_prefix, []

    def spy(*args):
        used.append(real(*args) is not None)
        return real(*args)

    monkeypatch.setattr(nezha, "_item_logits_per_prefix", spy)
    shared = model.decode(hist, lengths, 6, decoder, exclude, beam_size=8)
    assert used == [True]  # the 8 requests' beams share the 4 prefixes: read once each
    monkeypatch.setattr(nezha, "_item_logits_per_prefix", lambda *args: None)
    per_beam = model.decode(hist, lengths, 6, decoder, exclude, beam_size=8)
    assert torch.equal(shared.items, per_beam.items)
    torch.testing.assert_close(shared.scores, per_beam.scores)


@pytest.mark.parametrize("backbone, item_head", [("hstu", False), ("transformer", False), ("hstu", True)])
@pytest.mark.parametrize("decoder", ["nezha", "beam"])
@pytest.mark.parametrize("verify", ["step", "end"])
def test_decoders_return_only_valid_distinct_unexcluded_items(backbone, item_head, decoder, verify):
    model = _model(backbone, num_items=15, item_head=item_head)
    hist = torch.tensor([[1, 2, 3, 4, 5, 6, 7, 8], [9, 0, 0, 0, 0, 0, 0, 0], [10, 11, 0, 0, 0, 0, 0, 0]])
    lengths = torch.tensor([8, 1, 2])
    exclude = [{1, 2, 3}, set(), {10, 11, 12, 13}]
    res = model.decode(hist, lengths, 6, decoder, exclude, verify=verify, beam_size=8)
    for row, ex in zip(res.items.tolist(), exclude):
        real = [i for i in row if i != 0]
        assert len(real) == len(set(real)) and all(1 <= i <= 15 for i in real) and not set(real) & ex
    assert torch.isinf(res.scores[res.items == 0]).all() and torch.isfinite(res.scores[res.items > 0]).all()
    if verify == "step":  # every final beam is valid, so k items come back (15 - 4 excluded >= 6)
        assert (res.items > 0).all() and int(res.invalid.sum()) == 0
    items, scores = model.retrieve(hist, lengths, 6, decoder=decoder, exclude=exclude)
    assert items.shape == scores.shape == (3, 6)
    assert (scores[:, :-1] >= scores[:, 1:]).all()


def test_retrieve_pads_when_the_catalogue_is_smaller_than_k_and_reads_only_recent_history():
    model = _model(num_items=5)
    items, scores = model.retrieve(torch.tensor([[1, 2]]), torch.tensor([2]), k=8, exclude=[{1}])
    assert sorted(items[0, :4].tolist()) == [2, 3, 4, 5] and items[0, 4:].tolist() == [0] * 4
    assert torch.isinf(scores[0, 4:]).all()
    hist, ln = recent(torch.tensor([[1, 2, 3, 4, 5, 1, 2, 3, 0]]), torch.tensor([8]), 6)
    assert hist.tolist() == [[3, 4, 5, 1, 2, 3]] and ln.tolist() == [6]


class _Zero(nn.Module):
    def forward(self, x, lengths):
        return torch.zeros_like(x)


def test_nezha_with_a_trivial_backbone_reproduces_hand_computed_beams():
    """Backbone = 0, so h_l = 0: logits_1 = b_1, s_2 = tanh(W_ih e_{t1}), logits_2 = W_2 s_2 + b_2, and so on."""
    torch.manual_seed(0)
    table = torch.tensor([[0, 0, 0]] + [list(t) for t in itertools.product(range(4), range(3), range(2))])
    cfg = NezhaConfig(num_items=24, codebook_sizes=RADICES, d_model=4, num_blocks=1, num_heads=1, max_history=3,
                      dropout=0.0, beam_size=3)
    model = NezhaRetriever(cfg).eval()
    model.set_semantic_ids(table)
    model.backbone = _Zero()
    with torch.no_grad():
        for rnn in model.draft_rnn:
            rnn.weight_ih.copy_(torch.eye(4))
            rnn.weight_hh.copy_(torch.eye(4) * 0.5)
            rnn.bias_ih.zero_()
            rnn.bias_hh.zero_()
    # hand computation, independent of the model's decoding code
    b1 = model.draft_out[0].bias.detach()
    lp1 = F.log_softmax(b1, -1)

    def lp(level, s):
        return F.log_softmax(model.draft_out[level].weight.detach() @ s + model.draft_out[level].bias.detach(), -1)

    def state(level, prefix):  # s after consuming codes prefix[:level]
        s = torch.zeros(4)
        for i in range(level):
            s = torch.tanh(model.draft_emb[i].weight.detach()[prefix[i]] + 0.5 * s)
        return s

    width = 3
    beams = sorted(((float(lp1[t]), (t,)) for t in range(4)), reverse=True)[:width]
    for level in (1, 2):
        cands = [(sc + float(lp(level, state(level, p))[t]), (*p, t)) for sc, p in beams for t in range(RADICES[level])]
        beams = sorted(cands, reverse=True)[:width]
    item_of = {tuple(r): i for i, r in enumerate(table.tolist()) if i > 0}
    with torch.no_grad():
        items, scores = model.retrieve(torch.tensor([[5, 6]]), torch.tensor([2]), k=3, decoder="nezha")
    assert items[0].tolist() == [item_of[p] for _, p in beams]
    torch.testing.assert_close(scores[0], torch.tensor([sc for sc, _ in beams]), atol=1e-5, rtol=1e-5)


def test_init_from_codebooks_places_centroids_on_both_sides_and_rejects_wrong_shapes():
    model = _model()
    books = [torch.randn(4, 16), torch.randn(3, 16)]  # levels 1-2; level 3 (collision code) keeps its init
    before = model.code_emb[2].weight.clone()
    model.init_from_codebooks(books)
    for level, book in enumerate(books):
        assert torch.equal(model.code_emb[level].weight, book)
        assert torch.equal(model.draft_out[level].weight, book) and torch.equal(model.lm_out[level].weight, book)
    assert torch.equal(model.code_emb[2].weight, before)
    # a history token is now the sum of its item's centroids (+ the untouched last level)
    items = torch.tensor([[3]])
    codes = model.semantic_ids[3]
    want = books[0][codes[0]] + books[1][codes[1]] + model.code_emb[2].weight[codes[2]]
    assert torch.allclose(model.item_tokens(items)[0, 0], want)
    with pytest.raises(ValueError, match="codebook 1 is"):
        model.init_from_codebooks([torch.randn(4, 16), torch.randn(3, 8)])
    with pytest.raises(ValueError, match="at most 2 codebooks"):
        model.init_from_codebooks([torch.randn(4, 16), torch.randn(3, 16), torch.randn(2, 16)])


def test_history_item_embeddings_start_tokens_at_the_dense_table_and_keep_shared_codes_apart():
    plain = _model()
    model = _model(item_embeddings=True)
    items = torch.tensor([[1, 2, 3, 0]])
    codes = model.semantic_ids[items]
    code_sum = sum(emb(codes[..., level]) for level, emb in enumerate(model.code_emb)) * (items > 0)[..., None]
    assert torch.allclose(model.item_tokens(items), code_sum)  # zero-initialised: code tokens until trained
    table = torch.randn(16, 16)
    model.init_from_item_table(table)
    tokens = model.item_tokens(torch.arange(16)[None])[0]
    assert torch.allclose(tokens[1:], table[1:], atol=1e-6) and torch.equal(tokens[0], torch.zeros(16))
    assert bool(model.loss(items[:, :3], torch.tensor([3]), torch.tensor([4])) > 0)
    with pytest.raises(ValueError, match="item table is"):
        model.init_from_item_table(torch.randn(16, 8))
    with pytest.raises(ValueError, match="no item embeddings"):
        plain.init_from_item_table(table)
