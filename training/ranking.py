"""Streaming one-pass ranking training on Ray Train: one `TorchTrainer`, DDP workers, progressive validation.

    run = train_ranking(config.load("embedded"))   # after ray_jobs.samples; see ray_jobs.train

The driver opens `samples_ranking` as a time-ordered stream (training.stream: the file list and the
contract, from the Delta log) and starts `num_workers` workers. Each worker reads its own share of
the rows from the table's files (`SampleStream.shard`: in round k, worker r takes batch k*workers + r),
so a step's workers train on adjacent batches and every row is scored by a model trained on exactly
the rows before its round. Each worker, per step: takes its next batch of requests, drops those
already trained on (after a restart), scores them with the current model (progressive validation:
scored before trained on), then trains on them; DDP averages the gradients. Every
`checkpoint_every_steps` the workers merge the samples they trained on into the stream position,
flush their scores and rank 0 reports a checkpoint (weights, optimiser, position).
A worker failure restarts the group from the latest checkpoint (`FailureConfig`). At the end the
driver computes the headline metrics from the kept scores and writes the model artifact. With
`position_bias_slots` the workers fit the ranker plus per-slot logit offsets (models/position.py): the
scores and checkpoints include the offsets, the artifact holds the ranker alone.

Every task output starts at its base rate's log-odds (models.heads.prior_logits), or a rare task's
first hundreds of steps are scored near 0.5 and dominate its logloss. The rates are those of the
stream's first `training.prior_requests` requests, read by the driver before training: those
requests are trained on like any other, but the headline metrics start after them (their own labels
set the scores' mean), and `metrics["prior"]` records how many there were and the rates.

Workers may run out of rows at different steps (the last round may not reach every worker): a worker
without rows takes a zero-loss step on a one-row dummy batch so DDP's collectives stay matched, and the
loop ends when no worker has rows left. A round whose rows were all trained before a restart is
skipped by every worker at once, so the workers stay in the same round.
"""

from __future__ import annotations

import json
import os
import tempfile
import threading
import time
from dataclasses import dataclass
from datetime import UTC, datetime

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import ray
import torch
import torch.distributed as dist
from safetensors.torch import load_file, save_file
from torch import nn

from config.schema import PlatformConfig, TrainingConfig
from models.heads import multitask_bce
from models.inputs import RankingInputs
from storage import filesystem
from training.artifact import save_artifact
from training.ranking_batch import RankingFeatures, encode, labels
from training.ranking_eval import auc_over_time, run_metrics
from training.ranking_models import build_trainable, extra_loss, ranker, ranker_of
from training.stream import SAMPLE_NO, PredictionLog, SampleStream, StreamPosition


@dataclass
class RankingRun:
    """What a run produced: the artifact folder, its metrics and where Ray Train kept the run."""

    artifact: str
    version: str
    metrics: dict
    run_dir: str
    seconds: float


def base_rates(stream: SampleStream, tasks: tuple[str, ...], requests: int) -> list[float] | None:
    """Each task's positive rate over the stream's first `requests` requests (None when 0), with half a
    positive and half a negative added (Jeffreys) so a task without positives there still gets a rate in (0, 1)."""
    if not requests:
        return None
    head = stream.head([f"label_{task}" for task in tasks], requests)
    rates = []
    for task in tasks:
        y = pc.list_flatten(head[f"label_{task}"]).to_numpy(zero_copy_only=False)
        rates.append((float(y.sum()) + 0.5) / (len(y) + 1.0))
    return rates


def train_ranking(cfg: PlatformConfig, log=print, artifact: str | None = None) -> RankingRun:
    """Run the trainer over the whole sample stream once and write the artifact (Ray must be initialised)
    to `artifact`, or by default to `<training.artifact_dir>/<run name>`."""
    from ray.train import CheckpointConfig, FailureConfig, RunConfig, ScalingConfig
    from ray.train.torch import TorchConfig, TorchTrainer

    t0 = time.perf_counter()
    t = cfg.training
    if t.use_gpu and not cfg.ray.address and not ray.cluster_resources().get("GPU"):
        # A local Ray without GPUs would wait for them forever (a cluster may still autoscale a GPU group).
        raise ValueError("training.use_gpu is true but this local Ray has no GPU; set training.use_gpu=false")
    ranker(t.model)  # an unknown name fails here, not in every worker
    stream = SampleStream.open(cfg.lake.table("samples_ranking"), cfg.lake.storage_options, t.max_requests)
    if t.prior_requests >= stream.num_samples:
        raise ValueError(f"training.prior_requests={t.prior_requests} leaves none of the stream's "
                         f"{stream.num_samples:,} requests to measure: lower it (0 = heads start at logit 0)")
    feats = RankingFeatures.from_contract(stream.contract, t.max_hist_len)
    rates = base_rates(stream, feats.tasks, t.prior_requests)
    name = t.run_name or f"{t.model.replace('+', 'p')}-{datetime.now(UTC):%Y%m%dT%H%M%S}"
    storage = t.storage_path if "://" in t.storage_path else os.path.abspath(t.storage_path)
    run_dir = f"{storage}/{name}"
    log(f"training {t.model} on {stream.num_samples:,} requests ({feats.kind}: {', '.join(feats.tasks)}) "
        f"with {t.num_workers} worker(s), {'GPU' if t.use_gpu else 'CPU'}; run {run_dir}")
    resources = {"CPU": t.cpus_per_worker, **({"GPU": t.gpus_per_worker} if t.use_gpu else {})}
    trainer = TorchTrainer(
        _train_loop,
        train_loop_config={"training": t.model_dump(), "features": feats.to_dict(), "run_dir": run_dir,
                           "num_samples": stream.num_samples, "base_rates": rates, "stream": stream},
        scaling_config=ScalingConfig(num_workers=t.num_workers, use_gpu=t.use_gpu, resources_per_worker=resources),
        run_config=RunConfig(name=name, storage_path=storage, failure_config=FailureConfig(max_failures=t.max_failures),
                             checkpoint_config=CheckpointConfig(num_to_keep=2)),
        torch_config=TorchConfig(backend="nccl" if t.use_gpu else "gloo"),
    )
    with _ProgressTail(f"{run_dir}/progress.log", log):
        result = trainer.fit()
    if result.checkpoint is None:
        raise RuntimeError(f"training run {run_dir} ended without a checkpoint: {result.error}")
    trained, model_config = build_trainable(t.model, feats, t)
    with result.checkpoint.as_directory() as folder:
        trained.load_state_dict(load_file(os.path.join(folder, "model.safetensors")))
        state = _read_json(os.path.join(folder, "state.json"))
    pred = PredictionLog.read(f"{run_dir}/predictions", feats.tasks)
    _check_once(pred, stream.num_samples, run_dir)
    measured = pred.filter(pc.greater_equal(pred[SAMPLE_NO], t.prior_requests))
    metrics = run_metrics(measured, feats.tasks, t.eval_last_fraction)
    metrics.update(model=t.model, requests=stream.num_samples, steps=state["step"], restarts=state["restarts"],
                   auc_over_time=auc_over_time(measured, feats.tasks[0]),
                   prior={"requests": t.prior_requests, "candidates": pred.num_rows - measured.num_rows,
                          "rates": dict(zip(feats.tasks, rates or [], strict=False))})
    if trained is not ranker_of(trained):  # the learned display-slot effect, for comparison with the logs
        offsets = trained.position.offsets.detach()
        metrics["position_offsets"] = {task: [round(v, 4) for v in offsets[:, i].tolist()]
                                       for i, task in enumerate(feats.tasks)}
    model = ranker_of(trained)
    metadata = {"ranking_features": feats.to_dict(), "tasks": list(feats.tasks), "model": t.model,
                "training": t.model_dump(), "samples": cfg.lake.table("samples_ranking"), "run_dir": run_dir}
    folder = artifact or os.path.join(t.artifact_dir, name)
    manifest = save_artifact(folder, model, model_config, metadata, metrics, name=name)
    return RankingRun(artifact=folder, version=manifest.version, metrics=metrics, run_dir=run_dir,
                      seconds=round(time.perf_counter() - t0, 1))


def _read_json(path: str) -> dict:
    with open(path) as f:
        return json.load(f)


def _check_once(pred: pa.Table, num_samples: int, run_dir: str) -> None:
    """Every sample of the stream was scored (and so trained on) exactly once in the kept history."""
    requests = np.unique(pred[SAMPLE_NO].to_numpy())
    steps = pc.unique(pa.table({"s": pred[SAMPLE_NO], "k": pred["step"]}).group_by("s").aggregate(
        [("k", "count_distinct")])["k_count_distinct"]).to_pylist() if pred.num_rows else []
    if len(requests) != num_samples or any(c > 1 for c in steps):
        raise RuntimeError(f"{run_dir}: the kept scores cover {len(requests):,} of {num_samples:,} requests "
                           f"(or a request was trained on in two steps); the run is not a clean single pass")


class _ProgressTail:
    """Prints the lines rank 0 appends to the progress file while the trainer runs (local storage only)."""

    def __init__(self, path: str, log):
        self.path, self.log, self.stop = path, log, threading.Event()
        self.thread = threading.Thread(target=self._run, daemon=True)

    def __enter__(self):
        if "://" not in self.path:
            self.thread.start()
        return self

    def __exit__(self, *exc):
        self.stop.set()
        if self.thread.is_alive():
            self.thread.join(timeout=5)

    def _run(self) -> None:
        pos = 0
        while True:
            stopping = self.stop.is_set()
            if os.path.exists(self.path):
                with open(self.path) as f:
                    f.seek(pos)
                    for line in f.readlines():
                        self.log(line.rstrip())
                    pos = f.tell()
            if stopping:
                return
            self.stop.wait(0.5)


def _dummy_inputs(feats: RankingFeatures) -> tuple[RankingInputs, torch.Tensor]:
    """One request, one history event, one candidate: the zero-loss step of a worker without rows."""
    one, w = torch.ones(1, dtype=torch.long), len(feats.stat_names)
    inputs = RankingInputs(user_ids=one, request_ts=one, hist_item_ids=one[:, None], hist_author_ids=one[:, None],
                           hist_actions=one[:, None], hist_ts=one[:, None], hist_lengths=one,
                           cand_item_ids=one[:, None], cand_author_ids=one[:, None], num_candidates=one,
                           cand_dense=torch.zeros(1, 1, 2 * w), user_dense=torch.zeros(1, w))
    return inputs, torch.zeros(1, 1, len(feats.tasks))


def _train_loop(config: dict) -> None:
    """One Ray Train worker (see the module docstring)."""
    import ray.train
    import ray.train.torch
    from ray.train import Checkpoint

    t = TrainingConfig(**config["training"])
    feats = RankingFeatures.from_dict(config["features"])
    run_dir, num_samples = config["run_dir"], config["num_samples"]
    ctx = ray.train.get_context()
    rank = ctx.get_world_rank()
    if not t.use_gpu:
        torch.set_num_threads(max(1, int(t.cpus_per_worker)))
    torch.manual_seed(t.seed)
    model, _ = build_trainable(t.model, feats, t, config["base_rates"])
    position, step, restarts = StreamPosition(num_samples), 0, 0
    checkpoint = ray.train.get_checkpoint()
    optimizer_state = None
    if checkpoint is not None:
        with checkpoint.as_directory() as folder:
            model.load_state_dict(load_file(os.path.join(folder, "model.safetensors")))
            optimizer_state = torch.load(os.path.join(folder, "optimizer.pt"), weights_only=True)
            with open(os.path.join(folder, "position.npz"), "rb") as f:
                position = StreamPosition.from_bytes(f.read())
            state = _read_json(os.path.join(folder, "state.json"))
            step, restarts = state["step"], state["restarts"] + 1
    preds = PredictionLog(f"{run_dir}/predictions", rank, feats.tasks)
    preds.rollback(after_step=step)
    ddp = ray.train.torch.prepare_model(model, parallel_strategy_kwargs={
        "find_unused_parameters": ranker(t.model).unused_parameters})
    device = ray.train.torch.get_device()
    optimizer = torch.optim.AdamW(_param_groups(model, t), lr=t.lr, weight_decay=t.weight_decay)
    if optimizer_state is not None:
        optimizer.load_state_dict(optimizer_state)
    weights = torch.tensor([t.task_weights.get(task, 1.0) for task in feats.tasks], device=device)
    autocast = torch.autocast(device.type, dtype=torch.bfloat16, enabled=t.use_gpu and t.bf16)
    dummy = _dummy_inputs(feats)
    progress = _Progress(run_dir, rank, feats.tasks[0], position.count, restarts)
    if "://" not in run_dir:  # which process is which rank: for operators, and the fault test's kill
        os.makedirs(f"{run_dir}/workers", exist_ok=True)
        with open(f"{run_dir}/workers/rank-{rank}.pid", "w") as f:
            f.write(f"{os.getpid()}\n")
    progress.say(f"worker {rank}: {'resumed at step ' + str(step) if checkpoint else 'started'}, "
                 f"{position.count:,} of {num_samples:,} requests already trained")
    stream: SampleStream = config["stream"]
    rows_iter = stream.shard(list(stream.contract.columns), t.batch_size, rank, ctx.get_world_size(),
                             start=position.watermark)
    trained_since: list[np.ndarray] = []

    while True:
        rows = next(rows_iter, None)
        done = rows is None
        if rows is not None:
            rows = rows.filter(pa.array(position.untrained(rows[SAMPLE_NO].to_numpy())))
        n = 0 if rows is None else rows.num_rows
        status = torch.tensor([n, 0 if done else 1], dtype=torch.long)
        dist.all_reduce(status)
        if status[0] == 0:
            if status[1] == 0:
                break
            continue
        if n:
            inputs, y = encode(rows, feats), labels(rows, feats)
        else:
            inputs, y = dummy
        inputs, y = inputs.to(device), y.to(device)
        if n:
            model.eval()
            with torch.no_grad(), autocast:
                probs = torch.sigmoid(model(inputs).float())
            _log_scores(preds, rows, inputs, probs, y)
            progress.scored(y, probs, inputs.candidate_mask())
        model.train()
        with autocast:
            logits = ddp(inputs)
            loss = multitask_bce(logits.float(), y, inputs.candidate_mask(), weights) + extra_loss(t.model, model)
        optimizer.zero_grad(set_to_none=True)
        (loss * (1.0 if n else 0.0)).backward()
        nn.utils.clip_grad_norm_(model.parameters(), t.grad_clip_norm)
        optimizer.step()
        step += 1
        if n:
            trained_since.append(rows[SAMPLE_NO].to_numpy())
            progress.trained(n, loss.item())
        if step % t.log_every_steps == 0:
            progress.line(step, num_samples)
        if step % t.checkpoint_every_steps == 0:
            _checkpoint(model, optimizer, position, preds, trained_since, step, restarts, rank, Checkpoint)
            trained_since = []
    _checkpoint(model, optimizer, position, preds, trained_since, step, restarts, rank, Checkpoint)
    progress.line(step, num_samples, final=True)


def _param_groups(model: nn.Module, t: TrainingConfig) -> list[dict]:
    """The ranker at `lr`; the display-slot offsets, if any, at `position_bias_lr` without weight decay."""
    ranker = ranker_of(model)
    if ranker is model:
        return [{"params": list(model.parameters())}]
    return [{"params": list(ranker.parameters())},
            {"params": list(model.position.parameters()), "lr": t.position_bias_lr, "weight_decay": 0.0}]


def _log_scores(preds: PredictionLog, rows: pa.Table, inputs: RankingInputs, probs: torch.Tensor,
                y: torch.Tensor) -> None:
    mask = inputs.candidate_mask().cpu().numpy()
    req = np.nonzero(mask)[0]
    preds.add(rows[SAMPLE_NO].to_numpy()[req], rows["user_id"].to_numpy()[req],
              inputs.request_ts.cpu().numpy()[req], probs.cpu().numpy()[mask], y.cpu().numpy()[mask])


def _checkpoint(model: nn.Module, optimizer, position: StreamPosition, preds: PredictionLog,
                trained_since: list[np.ndarray], step: int, restarts: int, rank: int, checkpoint_cls) -> None:
    """Merge every worker's trained samples into the position, flush scores, report a checkpoint (rank 0)."""
    import ray.train

    mine = np.concatenate(trained_since) if trained_since else np.zeros(0, np.int64)
    gathered: list = [None] * dist.get_world_size()
    dist.all_gather_object(gathered, mine)
    for part in gathered:
        position.mark(part)
    preds.flush(step)
    metrics = {"step": step, "trained": position.count, "watermark": position.watermark}
    if rank != 0:
        ray.train.report(metrics, checkpoint=None)
        return
    with tempfile.TemporaryDirectory() as folder:
        save_file({k: v.detach().cpu().contiguous() for k, v in model.state_dict().items()},
                  os.path.join(folder, "model.safetensors"))
        torch.save(optimizer.state_dict(), os.path.join(folder, "optimizer.pt"))
        with open(os.path.join(folder, "position.npz"), "wb") as f:
            f.write(position.to_bytes())
        with open(os.path.join(folder, "state.json"), "w") as f:
            json.dump({**metrics, "restarts": restarts}, f)
        ray.train.report(metrics, checkpoint=checkpoint_cls.from_directory(folder))


class _Progress:
    """Per-chunk log lines of rank 0 (a progress file the driver prints, and the worker's stdout)."""

    def __init__(self, run_dir: str, rank: int, task: str, already: int, restarts: int):
        self.rank, self.task, self.start = rank, task, time.perf_counter()
        self.already, self.done, self.loss, self.restarts = already, 0, float("nan"), restarts
        self.y: list[np.ndarray] = []
        self.p: list[np.ndarray] = []
        local = "://" not in run_dir
        self.path = os.path.join(run_dir, "progress.log") if local and rank == 0 else None
        if local:
            filesystem(run_dir)[0].create_dir(filesystem(run_dir)[1], recursive=True)

    def say(self, text: str) -> None:
        print(text, flush=True)
        if self.path:
            with open(self.path, "a") as f:
                f.write(text + "\n")

    def scored(self, y: torch.Tensor, probs: torch.Tensor, mask: torch.Tensor) -> None:
        self.y.append(y[..., 0][mask].cpu().numpy())
        self.p.append(probs[..., 0][mask].cpu().numpy())

    def trained(self, n: int, loss: float) -> None:
        self.done += n
        self.loss = loss

    def line(self, step: int, total: int, final: bool = False) -> None:
        if self.rank != 0:
            return
        y = np.concatenate(self.y) if self.y else np.zeros(0)
        p = np.concatenate(self.p) if self.p else np.zeros(0)
        chunk_auc = _safe_auc(y, p)
        self.y, self.p = [], []
        rate = self.done / max(time.perf_counter() - self.start, 1e-9)
        share = (self.already + self.done * _world()) / max(total, 1)
        self.say(f"{'done' if final else 'step'} {step:>6} | worker 0 trained {self.done:,} requests "
                 f"({rate:,.0f}/s) | loss {self.loss:.4f} | chunk AUC({self.task}) {chunk_auc:.4f} | "
                 f"~{min(100.0, 100.0 * share):.0f}% of the stream")


def _world() -> int:
    return dist.get_world_size() if dist.is_initialized() else 1


def _safe_auc(y: np.ndarray, p: np.ndarray) -> float:
    from training.metrics import auc

    return auc(y, p) if len(y) and 0 < y.sum() < len(y) else float("nan")
