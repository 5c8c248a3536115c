"""Next-item losses: a softmax over the whole catalogue, or a sampled softmax with one set of uniform
negatives per training sequence.

Full softmax (the default since 2026-12-04): every catalogue item is a negative at every position. The
recent SASRec literature (Klenitskiy & Vasilev 2023, "gSASRec" and "eSASRec") found the loss, not the
encoder, to be what kept SASRec-class models below BERT4Rec and generative retrievers; with cross-entropy over
the whole catalogue SASRec reaches R@10 ~.09 on Amazon Beauty. At 12-20k items the [positions, items] logits of
a batch are cheap on a CPU; a multi-million catalogue would go back to sampling (with logQ correction).

Sampled softmax (`per_sequence_sampled_softmax`):

`SequentialRetriever.loss` (models/retrieval.py) draws ONE set of negatives per batch, shared by
all ~13k positions of an ML-1M batch, so each step pushes only 128 item rows away. On ML-1M that
trains far slower than the public recipe (HSTU's code draws negatives per position): measured once
on an H100 (ML-1M users 1-2999, seed 0, 60 epochs), test HR@10 reached SASRec .111 / HSTU .167 with
batch-shared negatives against .189 / .203 with per-sequence ones. Per position costs a
[positions, negatives, d] gather (~330 MB per ML-1M batch), too slow on 2 CPU cores; per sequence
is a [B, negatives, d] gather and one batched matmul. Everything else is the model's loss: cosine
similarity over L2-normalised states and item table, the model's temperature (0.05), accidental
hits (a negative equal to the position's target) masked, mean over positions that have a next item.

>>> import torch
>>> from models.sasrec import SASRec
>>> model = SASRec(num_items=30, d_model=8, num_blocks=1, max_len=10, dropout=0.0)
>>> ids = torch.randint(1, 31, (4, 10)); lengths = torch.tensor([10, 6, 2, 9])
>>> bool(per_sequence_sampled_softmax(model, ids, None, lengths, num_negatives=16) > 0)
True
>>> bool(full_softmax(model, ids, None, lengths) > 0)
True
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from models.retrieval import SequentialRetriever


def per_sequence_sampled_softmax(model: SequentialRetriever, item_ids: torch.Tensor, timestamps: torch.Tensor | None,
                                 lengths: torch.Tensor, num_negatives: int = 128,
                                 generator: torch.Generator | None = None) -> torch.Tensor:
    """Mean sampled-softmax loss of predicting item t+1 from the state at t, negatives drawn per row.

    `generator` is a CPU generator (the ids are moved to the model's device), as for the model's loss.
    """
    out = model(item_ids, timestamps, lengths)[:, :-1]  # [B, N-1, d]
    target = item_ids[:, 1:]
    b, n = target.shape
    valid = torch.arange(n, device=target.device)[None, :] < (lengths[:, None] - 1)
    table = model.item_embeddings()
    pos = (out * table[target]).sum(-1, keepdim=True)  # [B, N-1, 1]
    neg_ids = torch.randint(1, model.num_items + 1, (b, num_negatives), generator=generator).to(target.device)
    neg = torch.bmm(out, table[neg_ids].transpose(1, 2))  # [B, N-1, K]
    neg = neg.masked_fill(neg_ids[:, None, :] == target[..., None], float("-inf"))
    logits = torch.cat([pos, neg], dim=-1)[valid] / model.temperature
    return F.cross_entropy(logits, torch.zeros(logits.shape[0], dtype=torch.long, device=logits.device))


def full_softmax(model: SequentialRetriever, item_ids: torch.Tensor, timestamps: torch.Tensor | None,
                 lengths: torch.Tensor) -> torch.Tensor:
    """Mean cross-entropy of item t+1 against every catalogue item, from the state at t.

    Same scores as serving ranks by (`score_all`: the model's cosine over its temperature); column 0, the
    padding row, is never a candidate.
    """
    out = model(item_ids, timestamps, lengths)[:, :-1]
    target = item_ids[:, 1:]
    valid = torch.arange(target.shape[1], device=target.device)[None, :] < (lengths[:, None] - 1)
    # The temperature divides the [P, d] states, not the [P, num_items] logits: one pass over the big tensor less.
    logits = (out[valid] / model.temperature) @ model.item_embeddings()[1:].T  # [P, num_items]
    return F.cross_entropy(logits, target[valid] - 1)
