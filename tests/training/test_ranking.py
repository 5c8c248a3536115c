"""Streaming one-pass training on Ray Train, end to end on a small simulator lake.

One lake per module (simulate -> ingest -> features -> samples). Then: a 2-worker run that scores
every request exactly once before training on it and writes a loadable artifact whose scores match
its own progressive log at the end of the stream; and the fault test: SIGKILL one training worker
mid-pass, the run restarts from its latest checkpoint, finishes, and no request consumed before that
checkpoint is trained on again. And the negative control: with labels shuffled across candidates the
same path measures AUC 0.5 within its sampling error, unless the label leaks into the features.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pytest

import config
from bench.train_fault import train_and_kill

SIM_EVENTS = 40_000


def lake_overrides(root: Path) -> list[str]:
    return [f"lake.root={root / 'lake'}", f"ingest.landing_dir={root / 'landing'}",
            f"simulator.oracle_dir={root / 'oracle'}", f"simulator.events={SIM_EVENTS}", "simulator.users=400",
            "simulator.streamers=60", f"features.feast_dir={root / 'feast'}", "features.partitions=2",
            f"features.online_store.path={root / 'feast' / 'online.db'}", "training.model=dlrm",
            "training.batch_size=32", "training.embed_dim=16", "training.max_hist_len=32",
            f"training.storage_path={root / 'runs'}", f"training.artifact_dir={root / 'artifacts'}"]


@pytest.fixture(scope="module")
def sim_lake(tmp_path_factory, ray_local):
    from features.job import FeatureJob
    from features.samples import SampleBuilder
    from ingestion.job import IngestJob
    from ingestion.simulator import simulate

    root = tmp_path_factory.mktemp("ranking_lake")
    cfg = config.load(None, lake_overrides(root))
    simulate(cfg.simulator, cfg.ingest.landing_dir, fsync=False)
    IngestJob(cfg).run_once()
    FeatureJob(cfg).run(materialize=False)
    report = SampleBuilder(cfg).run()
    assert report.requests > 1000
    return root, cfg, report


def test_one_pass_scores_each_request_once_and_writes_an_artifact(sim_lake):
    from deltalake import DeltaTable

    from training.artifact import load_artifact
    from training.ranking import train_ranking
    from training.ranking_batch import RankingFeatures, encode
    from training.stream import PredictionLog

    root, cfg, report = sim_lake
    run_cfg = config.load(None, [*lake_overrides(root), "training.run_name=plain",
                                 "training.checkpoint_every_steps=20"])
    lines: list[str] = []
    run = train_ranking(run_cfg, log=lines.append)
    m = run.metrics
    assert m["requests"] == report.requests and m["restarts"] == 0
    pred = PredictionLog.read(f"{run.run_dir}/predictions", ("click",))
    assert sorted(set(pred["sample_no"].to_pylist())) == list(range(report.requests))
    assert_round_robin(Path(run.run_dir) / "predictions", run_cfg.training, report.requests)
    # every candidate scored; the metrics start after the requests whose label rates primed the heads
    prior = m["prior"]
    assert prior["requests"] == run_cfg.training.prior_requests and set(prior["rates"]) == set(m["progressive"])
    assert pred.num_rows == report.candidates == m["candidates"] + prior["candidates"]
    first = pred.filter(pc.less(pred["sample_no"], prior["requests"]))
    assert prior["rates"]["click"] == pytest.approx(pc.mean(first["y_click"]).as_py(), rel=0.05)
    # Started at the base rates, even the rare tasks are better than predicting their rate all along.
    for task, v in m["progressive"].items():
        assert v["ne"] < 1, (task, v)
    assert 0.8 < m["progressive"]["click"]["calibration"] < 1.25
    # The simulator's clicks depend on the user and item: one pass already ranks above chance.
    assert m["progressive"]["click"]["auc"] > 0.55 and m["last"]["click"]["auc"] > 0.55
    assert any(line.startswith("step ") and "chunk AUC(click)" in line for line in lines)
    # The embedded profile learns display-slot offsets beside the ranker; the artifact holds the ranker alone.
    assert len(m["position_offsets"]["click"]) == run_cfg.training.position_bias_slots == 16

    model, manifest = load_artifact(run.artifact)
    feats = RankingFeatures.from_dict(manifest.metadata["ranking_features"])
    assert manifest.metrics["progressive"]["click"]["auc"] == pytest.approx(m["progressive"]["click"]["auc"])
    assert feats.tasks == ("click", "long_view", "like", "follow", "gift")
    # The artifact is the model after the whole stream: it scores the last rows as a fresh run of it would.
    rows = DeltaTable(cfg.lake.table("samples_ranking")).to_pyarrow_table().slice(report.requests - 8, 8)
    model.eval()
    logits = model(encode(rows, feats))
    assert logits.shape[:1] == (8,) and np.isfinite(logits.detach().numpy()).all()

    from ingestion.simulator_world import LOGIT_TERMS
    from training.oracle import click_logit_terms, oracle_auc_on_samples, oracle_candidates
    from training.stream import PredictionLog

    # The ceiling on the same rows, whole and per time slice (the slices the run's own AUC-over-time uses).
    ceiling = oracle_auc_on_samples(cfg.simulator.oracle_dir, cfg.lake.table("samples_ranking"),
                                    from_sample=prior["requests"])
    assert ceiling["matched"] == ceiling["candidates"] == m["candidates"]
    assert ceiling["auc"] > m["progressive"]["click"]["auc"]
    assert [p["ts"] for p in ceiling["auc_over_time"]] == [p["ts"] for p in m["auc_over_time"]]
    # Per term: the ceiling blind to it (the item's popularity and liveness are a large term), and the model's
    # logit fitted on the terms over every candidate it was measured on.
    assert set(ceiling["auc_without"]) == set(LOGIT_TERMS)
    assert ceiling["auc_without"]["item"] < ceiling["auc"]
    joined, _ = oracle_candidates(cfg.simulator.oracle_dir, cfg.lake.table("samples_ranking"),
                                  from_sample=prior["requests"])
    fit = click_logit_terms(joined, PredictionLog.read(f"{run.run_dir}/predictions", ("click",)))
    assert fit["candidates"] == m["candidates"] and set(fit["terms"]) == set(LOGIT_TERMS)
    assert 0 < fit["r2"] <= 1


def assert_round_robin(predictions: Path, t, requests: int) -> None:
    """Each worker scored exactly its own batches: batch i (samples [i*b, (i+1)*b)) on worker i mod workers."""
    import pyarrow.parquet as pq

    for rank in range(t.num_workers):
        files = sorted(predictions.glob(f"step-*-rank-{rank}.parquet"))
        seen = np.unique(np.concatenate([pq.read_table(f, columns=["sample_no"])["sample_no"].to_numpy()
                                         for f in files]))
        mine = np.arange(requests)
        assert seen.tolist() == mine[(mine // t.batch_size) % t.num_workers == rank].tolist(), rank


def test_killed_worker_resumes_from_checkpoint_without_training_twice(sim_lake):
    from training.artifact import load_artifact
    from training.stream import PredictionLog

    root, _, report = sim_lake
    run_dir = root / "runs" / "faulty"
    every = 10
    overrides = [*lake_overrides(root), "training.run_name=faulty", f"training.checkpoint_every_steps={every}",
                 "training.log_every_steps=1"]
    # past the first checkpoint, before the end of the stream
    run = train_and_kill(overrides, run_dir, root / "artifacts" / "faulty", kill_after_step=every + 3, timeout_s=600)
    assert run["killed_at"] is not None, "the run ended before a worker could be killed mid-pass"
    assert run["returncode"] == 0, run["output"][-3000:]

    _, manifest = load_artifact(root / "artifacts" / "faulty")
    assert manifest.metrics["restarts"] >= 1
    kept = PredictionLog.read(str(run_dir / "predictions"), ("click",))
    per_request = {}
    for s, step in zip(kept["sample_no"].to_pylist(), kept["step"].to_pylist(), strict=True):
        per_request.setdefault(s, set()).add(step)
    assert sorted(per_request) == list(range(report.requests))  # every request trained on ...
    assert all(len(steps) == 1 for steps in per_request.values())  # ... in exactly one kept step
    assert_round_robin(run_dir / "predictions", config.load(None, overrides).training, report.requests)
    log = (run_dir / "progress.log").read_text()
    resumed_from = int(log.split("resumed at step ")[1].split(",")[0])
    assert resumed_from >= run["resumable_from"] >= every and resumed_from % every == 0
    lost = PredictionLog.read(str(run_dir / "predictions"), ("click",), rolled_back=True)
    for s, step in zip(lost["sample_no"].to_pylist(), lost["step"].to_pylist(), strict=True):
        # only work after the checkpoint was lost, and it was redone after the resume
        assert step > resumed_from and min(per_request[s]) > resumed_from


def test_use_gpu_without_a_gpu_is_a_clear_error(sim_lake):
    import torch

    from training.ranking import train_ranking

    if torch.cuda.is_available():
        pytest.skip("a GPU is present: test_gpu_run covers use_gpu")
    root, _, _ = sim_lake
    with pytest.raises(ValueError, match=r"training\.use_gpu"):
        train_ranking(config.load(None, [*lake_overrides(root), "training.use_gpu=true"]))


@pytest.mark.gpu
def test_gpu_run_with_bf16_autocast(sim_lake):
    from training.ranking import train_ranking

    root, _, report = sim_lake
    run = train_ranking(config.load(None, [*lake_overrides(root), "training.use_gpu=true", "training.num_workers=1",
                                           "training.cpus_per_worker=1", "training.model=genrank",
                                           "training.run_name=gpu"]))
    assert run.metrics["requests"] == report.requests and run.metrics["progressive"]["click"]["auc"] > 0.55


def shuffled_samples(cfg, root: Path, leak: bool, requests: int, seed: int = 0) -> Path:
    """A lake holding only the first `requests` samples, every task's labels permuted across all their candidates
    (one permutation, so the tasks keep their joint distribution); with `leak`, each candidate's item stats are
    replaced by its permuted click label, the way a leaking feature would carry it. The commit keeps the
    builder's contract, so training reads the table as it reads any other."""
    from deltalake import CommitProperties, DeltaTable, write_deltalake

    source = DeltaTable(cfg.lake.table("samples_ranking"))
    contract = next(h for h in source.history() if h["operation"] == "WRITE" and "tasks" in h)
    meta = {k: v for k, v in contract.items() if k in ("kind", "tasks", "stat_names", "columns", "num_users",
                                                        "num_items", "num_authors")}
    table = source.to_pyarrow_table(filters=[("sample_no", "<", requests)]).sort_by("sample_no")
    offsets = table["label_click"].combine_chunks().offsets
    order = np.random.default_rng(seed).permutation(len(pc.list_flatten(table["label_click"])))
    for task in meta["tasks"].split(","):
        col = f"label_{task}"
        values = pc.list_flatten(table[col]).to_numpy()[order]
        table = table.set_column(table.schema.get_field_index(col), col,
                                 pa.ListArray.from_arrays(offsets, pa.array(values, pa.int8())))
    if leak:
        stats = table["cand_item_stats"].combine_chunks()
        width = len(meta["stat_names"].split(","))
        clicks = pc.list_flatten(table["label_click"]).to_numpy().astype(np.float32)
        inner = pa.ListArray.from_arrays(pa.array(np.arange(0, (len(clicks) + 1) * width, width, dtype=np.int32)),
                                         pa.array(np.repeat(clicks, width), pa.float32()))
        table = table.set_column(table.schema.get_field_index("cand_item_stats"), "cand_item_stats",
                                 pa.ListArray.from_arrays(stats.offsets, inner))
    lake = root / ("leaky" if leak else "shuffled")
    write_deltalake(str(lake / "samples_ranking"), table, commit_properties=CommitProperties(custom_metadata=meta))
    return lake


def null_auc_se(positives: int, negatives: int) -> float:
    """Standard error of the AUC of scores independent of the labels (Hanley & McNeil 1982, at AUC = 0.5)."""
    return float(np.sqrt((positives + negatives + 1) / (12.0 * positives * negatives)))


@pytest.mark.parametrize("leak", [False, True], ids=["shuffled", "shuffled-and-leaked"])
def test_shuffled_labels_measure_chance_unless_the_label_leaks(sim_lake, leak):
    """The negative control runs the real path (stream, Ray Train workers, progressive log, metrics) on labels
    that nothing can predict: its AUC must be 0.5 within 4 standard errors of its own sample. The leaked
    variant shows the check has teeth: the same labels, also written into a feature, are learnt at once."""
    from training.ranking import train_ranking

    root, cfg, _ = sim_lake
    lake = shuffled_samples(cfg, root, leak, requests=1500)
    # one worker: the same loop, without a second process to start
    run = train_ranking(config.load(None, [*lake_overrides(root), f"lake.root={lake}", "training.prior_requests=100",
                                           "training.num_workers=1", "training.cpus_per_worker=1",
                                           f"training.run_name={lake.name}", "training.checkpoint_every_steps=100"]),
                        log=lambda line: None)
    click = run.metrics["progressive"]["click"]
    se = null_auc_se(click["positives"], click["count"] - click["positives"])
    assert click["positives"] > 200 and se < 0.02, click  # enough rows for the control to mean something
    if leak:
        assert click["auc"] > 0.5 + 4 * se, click
    else:
        assert abs(click["auc"] - 0.5) < 4 * se, (click, se)
