"""Typed configuration shared by every stage (one system: YAML profiles + `--set` overrides).

A profile is a YAML file whose keys mirror `PlatformConfig`; unknown keys are errors, so a typo
never silently falls back to a default. `config.load` reads a profile and applies overrides.
`models/` never imports this: stages translate the relevant section into model arguments.
"""

from __future__ import annotations

from typing import Annotated, Literal

from pydantic import BaseModel, ConfigDict, Field, PrivateAttr, model_serializer, model_validator


class Section(BaseModel):
    # Errors name the key, never the value: a value may be a secret expanded from the environment.
    model_config = ConfigDict(extra="forbid", validate_assignment=True, hide_input_in_errors=True)


class RayConfig(Section):
    address: str | None = Field(None, description="Ray cluster address; None starts a local Ray")
    num_cpus: int | None = Field(None, description="CPUs of a local Ray (None: all), and the ingestion job's parse "
                                 "threads when it runs without Ray (ingest.parse_on)")
    object_store_memory_mb: int = 512
    # Keep every local Ray process on loopback (STACK.md).
    local_ip: str = "127.0.0.1"


# delta-rs options that would put credentials in a profile (they come from the environment: a Secret).
S3_CREDENTIAL_OPTIONS = frozenset({"AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_SESSION_TOKEN"})


class LakeConfig(Section):
    root: str = "data/lake"
    storage_options: dict[str, str] = Field(default_factory=dict)
    # Local folder for Great Expectations' project and Data Docs; None = <root>/_gx (local lakes).
    gx_dir: str | None = None
    # S3 over plain http only where a profile says so (an in-cluster MinIO without TLS, the rehearsal's local
    # server); config.load holds the environment's AWS_ENDPOINT_URL / AWS_ALLOW_HTTP to it as well.
    s3_allow_http: bool = False

    @model_validator(mode="after")
    def _s3_transport(self) -> LakeConfig:
        options = {k.upper(): v for k, v in self.storage_options.items()}
        if credentials := sorted(options.keys() & S3_CREDENTIAL_OPTIONS):
            raise ValueError(f"lake.storage_options: {credentials} are credentials; they come from the "
                             "environment (a Kubernetes Secret), never from a profile")
        if options.get("AWS_ALLOW_INVALID_CERTIFICATES", "").lower() == "true":
            raise ValueError("lake.storage_options: AWS_ALLOW_INVALID_CERTIFICATES turns S3 certificate checks "
                             "off; use a CA the system trusts instead")
        plain = options.get("AWS_ALLOW_HTTP", "").lower() == "true" or \
            options.get("AWS_ENDPOINT_URL", "").startswith("http://")
        if plain and not self.s3_allow_http:
            raise ValueError("lake.storage_options: AWS_ALLOW_HTTP or an http:// AWS_ENDPOINT_URL sends S3 traffic "
                             "unencrypted; set lake.s3_allow_http: true only for an S3 server without TLS")
        return self

    def table(self, name: str) -> str:
        return f"{self.root.rstrip('/')}/{name}"

    @property
    def events(self) -> str:
        return self.table("events")

    @property
    def quarantine(self) -> str:
        return self.table("events_quarantine")

    @property
    def ingest_batches(self) -> str:
        return self.table("_ingest_batches")

    @property
    def gx_root(self) -> str:
        if self.gx_dir:
            return self.gx_dir
        if "://" in self.root:
            raise ValueError("lake.gx_dir must be set when lake.root is remote")
        return self.table("_gx")


class BatchRulesConfig(Section):
    """Batch-level expectations (a failing batch is quarantined whole)."""

    min_rows_for_rates: int = Field(1000, description="rate rules apply to batches at least this large")
    max_null_rate: dict[str, float] = Field(
        default_factory=dict
    )
    action_share_bounds: dict[str, tuple[float, float]] = Field(
        default_factory=lambda: {"impression": (0.0, 0.99)}
    )


class IngestConfig(Section):
    landing_dir: str = "data/landing"
    file_patterns: list[str] = Field(default_factory=lambda: ["*.jsonl", "*.jsonl.gz"])
    max_batch_bytes: int = Field(256 << 20, description="landing bytes per ingestion batch")
    # A file waits up to one interval before --follow sees it (issue 18: landing -> online p99 within 2 s); an idle
    # poll lists the landing folder and checks the batches table's version (~2 ms here, a LIST or two on S3).
    poll_interval_s: float = Field(0.5, gt=0, description="--follow: seconds between looks at the landing folder")
    min_event_time: str = "2000-01-01T00:00:00Z"
    max_future_s: int = Field(300, ge=0, description="event times further ahead of the clock are quarantined")
    # Caps on one landing file: a file over either is quarantined (the lines read before the decompressed cap
    # land), so one hostile file costs bounded memory and time and never stops the batch.
    max_file_bytes: int = Field(2 << 30, gt=0, description="landing file size as stored (gzip: compressed)")
    max_decompressed_bytes: int = Field(8 << 30, gt=0, description="content bytes read from one landing file")
    # One ingestion run at a time per lake: a lease object in the lake, renewed while the run works.
    lease_ttl_s: float = Field(900.0, gt=0, description="a crashed holder's lease expires after this long")
    lease_wait_s: float = Field(60.0, ge=0, description="a second run waits this long for the lease, then fails")
    max_batch_attempts: int = Field(3, ge=1, description="runs that may try one planned batch before it is an error")
    parse_on: Literal["auto", "threads", "ray"] = Field(
        "auto", description="where a batch's files are parsed: Ray tasks (spread over a cluster's nodes) or the "
        "job's own threads (one machine: no Ray, no cold workers); auto = ray when ray.address is set")
    batch_rules: BatchRulesConfig = Field(default_factory=BatchRulesConfig)
    build_data_docs: bool = True
    data_docs_interval_s: float = Field(
        30.0, ge=0, description="Data Docs are rendered at most this often (validations wait and are rendered "
        "together; always at the end of a run)")
    gx_template_cache: str | None = Field(
        "~/.cache/streamrec/gx-templates", description="folder of the Data Docs' Jinja templates compiled to "
        "bytecode, shared by every run on the machine (as Python's __pycache__ is); null = compile them in every "
        "process (~0.1 s of a core per run). `python -m ingestion.expectations --compile-templates DIR` fills one "
        "ahead (the image build does, for a read-only folder)")
    data_docs_index_validations: int = Field(
        200, ge=1, description="the Data Docs index lists this many of the newest batch validations (every "
        "validation keeps its own page); GX reads each listed result at every render")


class SimulatorConfig(Section):
    seed: int = 7
    events: int = 200_000
    users: int = 5_000
    streamers: int = 500
    videos_per_streamer: int = 4
    topics: int = Field(20, ge=1, description="interest topics shared by users' tastes and items")
    # With ~2.5 requests per session and ~10 events per request, 5,000 users make ~1M events a day.
    sessions_per_user_day: float = Field(8.0, gt=0, description="how often an average user opens the app")
    start: str = "2026-01-05T00:00:00Z"
    impressions_per_request: int = 8
    events_per_file: int = 100_000
    gzip: bool = False
    malformed_rate: float = 0.0
    # Written next to (never inside) the landing folder: the true click probability per impression.
    oracle_dir: str = "data/oracle"


class DatasetsConfig(Section):
    root: str = "../shared/datasets"
    # Per-dataset user/item attribute tables (Parquet) go to <meta_dir>/<dataset>/.
    meta_dir: str = "data/datasets"


class OnlineStoreConfig(Section):
    type: Literal["sqlite", "redis"] = "sqlite"
    path: str = "data/feast/online.db"
    # Feast's form `host:port,db=0,password=...,ssl=true`; a secret (config.SECRET_KEYS), so not in repr.
    connection_string: str | None = Field(None, repr=False)
    # TLS to Redis: the connection string must carry Feast's `ssl=true` exactly when this is set.
    tls: bool = False
    # The serving client's socket timeout: past it the store counts as unreachable (serving falls back).
    timeout_ms: int = Field(200, gt=0)
    # Reader threads of one serving client (reads at once). Requests that arrive while they read wait, oldest
    # first, and the next read takes up to `requests_per_read` of them together (`features.merged_reads`); 1 reads
    # one request at a time. One reader thread measured best on 2 cores for both stores (a second one's reads
    # contend for the GIL with the first's): BENCHMARKS.md, feature store.
    concurrent_reads: int = Field(1, gt=0)
    requests_per_read: int = Field(32, gt=0)
    # SQLite: a read of 256 keys or more runs in this many slices at once, each on its own connection (sqlite3
    # releases the GIL while a query runs), so one reader thread uses two cores; 1 = one query per read.
    threads_per_read: int = Field(2, gt=0)
    # Redis: reads a reader thread keeps in flight at once. While the server answers one read's HMGETs, the
    # thread decodes another's replies or sends its commands; with 1 the server and the client take turns.
    reads_in_flight: int = Field(2, gt=0)

    @model_validator(mode="after")
    def _redis_connection(self) -> OnlineStoreConfig:
        if self.type != "redis":
            return self
        where = "features.online_store.connection_string"
        if not self.connection_string:
            raise ValueError(f"{where} is required for redis")
        nodes, options = [], {}
        for part in self.connection_string.split(","):
            key, is_option, value = part.partition("=")
            if is_option:
                options[key.strip().lower()] = value.strip().lower()  # only ssl and ssl_cert_reqs are read
            else:
                nodes.append(part)
        # Messages name the option, never the string: it holds the password.
        if any("://" in node for node in nodes):
            raise ValueError(f"{where}: Feast's form is host:port,db=0,password=...,ssl=true, not a redis:// "
                             "or rediss:// URL (for TLS set features.online_store.tls and ssl=true)")
        if not nodes or any(not host or (port and not port.isdigit())
                            for host, _, port in (node.strip().partition(":") for node in nodes)):
            raise ValueError(f"{where}: must start with host:port")
        if (options.get("ssl") == "true") != self.tls:
            raise ValueError(f"{where}: needs ssl=true when features.online_store.tls is set" if self.tls else
                             f"{where}: has ssl=true; set features.online_store.tls: true as well")
        if options.get("ssl_cert_reqs") == "none":
            raise ValueError(f"{where}: ssl_cert_reqs=none turns certificate checks off")
        return self


class FeaturesConfig(Section):
    windows_s: list[int] = Field(default_factory=lambda: [300, 3600, 86400],
                                 description="stat windows; each a multiple of hop_s (MovieLens: 1 d, 7 d, 30 d)")
    hop_s: int = Field(60, gt=0, description="offline stats rows are computed at multiples of this")
    sequence_length: int = Field(256, gt=0, description="N: the last N engagements kept per user")
    sequence_hop_s: int = Field(3600, gt=0, description="offline sequence snapshots at multiples of this")
    # Engagements that become sequence tokens (impressions are exposures, not engagements).
    sequence_actions: list[str] = Field(default_factory=lambda: [
        "click", "view", "like", "comment", "share", "follow", "gift", "rate"])
    # Smoothed rates: (events + strength * prior) / (impressions + strength).
    ctr_prior: float = 0.05
    ltr_prior: float = 0.01
    rate_prior_strength: float = Field(20.0, gt=0)
    project: str = "streamrec"
    feast_dir: str = Field("data/feast", description="local folder for the rendered Feast repo")
    registry: str | None = Field(None, description="Feast registry path or URI; None = <feast_dir>/registry.db")
    partitions: int = Field(4, gt=0, description="entity-hash partitions of the feature job (at least: more when "
                            "one would pass 100k events) and of the sample job's Ray Data groupbys")
    online_store: OnlineStoreConfig = Field(default_factory=OnlineStoreConfig)

    @model_validator(mode="after")
    def _windows_fit_hop(self) -> FeaturesConfig:
        if not self.windows_s or any(w <= 0 or w % self.hop_s for w in self.windows_s):
            raise ValueError(f"features.windows_s {self.windows_s} must be positive multiples of hop_s={self.hop_s}")
        return self


class SamplesConfig(Section):
    """Training samples (docs/design.md, "Training samples")."""

    kind: Literal["auto", "livestream", "ratings"] = Field(
        "auto", description="auto: ratings when the events hold `rate` actions and no impressions")
    long_view_s: float = Field(30.0, description="a view of at least this many seconds is a long view")
    # Engagements with the impression's request_id count as its labels if they come within this time.
    label_window_s: int = Field(6 * 3600, gt=0)
    # Ratings: one user's ratings within one window (aligned to the epoch) form one exposure group.
    group_window_s: int = Field(60, gt=0)
    max_candidates: int = Field(64, gt=0)
    retrieval_actions: list[str] = Field(default_factory=lambda: ["click", "rate"])
    retrieval_max_length: int = Field(512, gt=1)


class TrainingConfig(Section):
    """Streaming one-pass ranking training on Ray Train (training/ranking.py)."""

    # Names are interpreted in one place, training/ranking_models.py's RANKERS (config imports nothing): an
    # unknown name is refused there, by train_ranking, before any worker starts.
    model: str = Field("genrank", min_length=1, description="a ranker of training.ranking_models.RANKERS")
    num_workers: int = Field(2, ge=1, description="Ray Train workers (DDP ranks)")
    use_gpu: bool = False
    # STACK.md: with 2 workers on 2 CPUs, a whole CPU per worker starves Ray Data's readers.
    cpus_per_worker: float = Field(0.5, gt=0)
    gpus_per_worker: float = Field(1.0, gt=0)
    retriever_cpus: float = Field(1.0, gt=0, description=(
        "CPUs of the Ray task that trains the generative retriever on a cluster (ray.address set); with use_gpu "
        "it also takes one GPU"))
    batch_size: int = Field(128, ge=1, description="requests per worker per step")
    lr: float = Field(1e-3, gt=0)
    weight_decay: float = Field(0.0, ge=0)
    grad_clip_norm: float = Field(1.0, gt=0, description="one-pass training gets no second chance after a spike")
    embed_dim: int = Field(32, ge=1, description="DLRM / Zenith id embedding width")
    d_model: int = Field(64, ge=1, description="HSTU / GenRank / Zenith token width")
    num_blocks: int = Field(2, ge=1)
    num_heads: int = Field(2, ge=1)
    dropout: float = Field(0.1, ge=0, lt=1)
    max_hist_len: int = Field(128, ge=1, description="newest history events a model sees")
    sequence_side_features: bool = Field(True, description=(
        "hstu / genrank candidate tokens also carry what dlrm and zenith see: the user id and windowed stats, hour "
        "of day, history length and recency, the candidate's share of the history (models/heads.py RankerConfig); "
        "false: the history and the candidate's stats only"))
    sequence_head_dense: bool = Field(True, description=(
        "hstu / genrank task heads also read the candidate's stats and the side features beside the candidate "
        "state (models/heads.py RankerConfig.head_dense)"))
    position_bias_slots: int = Field(0, ge=0, description=(
        "learn a logit offset per display slot and task next to the ranker (models/position.py; kept out of the "
        "artifact); live-stream samples only, their candidates are in display order; 0 = off"))
    # Adam moves a parameter by about lr per step, so at the rankers' lr a one-pass run of a few hundred steps
    # could shift the offsets by only a few tenths of a logit; they are few and seen by every impression.
    position_bias_lr: float = Field(0.02, gt=0, description="learning rate of the display-slot offsets")
    task_weights: dict[str, float] = Field(default_factory=dict, description="loss weight per task (default 1)")
    prior_requests: int = Field(512, ge=0, description=(
        "the label rates of the stream's first N requests are the task outputs' starting log-odds; those requests "
        "are trained on but left out of the progressive metrics (their labels set the scores' mean); 0 = start at 0"))
    bf16: bool = Field(True, description="bf16 autocast on GPU (CPU always runs float32)")
    checkpoint_every_steps: int = Field(50, ge=1)
    max_failures: int = Field(2, ge=0, description="worker-group restarts before the run fails")
    log_every_steps: int = Field(20, ge=1)
    seed: int = 0
    max_requests: int | None = Field(None, ge=1, description="train on the first N requests only")
    eval_last_fraction: float = Field(0.1, gt=0, le=1, description="also report metrics on this last share of time")
    storage_path: str = Field("data/train_runs", description="Ray Train run storage (checkpoints, predictions)")
    run_name: str | None = Field(None, description="None: <model>-<UTC time>; reuse a name to resume a run")
    artifact_dir: str = "data/artifacts"


class ServingConfig(Section):
    """Ray Serve application (serving/, docs/serving.md); per-deployment Serve settings live in serving/config.yaml."""

    host: str = "127.0.0.1"
    port: int = Field(8000, gt=0, lt=65536)
    # cascade: the Ingress replica runs lookup, retrieval and ranking in process (no deployment hops; scale
    # out by Ingress replicas); split: Retriever and Ranker replicas do (scale each stage on its own).
    # Either way their deployments' user_config names the artifacts (docs/serving.md, "Modes").
    mode: Literal["cascade", "split"] = "cascade"
    num_candidates: int = Field(200, gt=0, le=500, description="items retrieved per /recommend, then ranked")
    max_k: int = Field(100, gt=0, description="largest k a /recommend may ask for")
    max_rank_items: int = Field(500, gt=0, le=500, description="largest item_ids list a /rank may send")
    max_events: int = Field(1000, gt=0, description="most events one POST /events may carry")
    max_body_bytes: int = Field(1 << 20, gt=0, description="larger request bodies get 413")
    # Ranking score = sum of weight * sigmoid(task logit); tasks not named weigh 0, empty = every task weighs 1.
    task_weights: dict[str, float] = Field(default_factory=dict)
    api_key_env: str = Field("STREAMREC_API_KEY", description="env var holding the /events API key")
    trending_size: int = Field(500, gt=0, description="items kept in the trending fallback list")
    trending_refresh_s: float = Field(60.0, gt=0)
    # Trending = engagements (non-impression actions) over this window; None = the longest features window.
    trending_window_s: int | None = None
    stage_timeout_s: float = Field(1.0, gt=0, description="a stage slower than this counts as unavailable")
    landing_prefix: str = "serving"


class DenseRetrieverConfig(Section):
    """A SASRec-class next-item model trained with a softmax over the whole catalogue (training.retrieval.dense).

    Defaults: the recipe measured on Amazon Beauty and Sports (BENCHMARKS.md, retrieval).
    """

    model: Literal["sasrec", "hstu"] = "sasrec"
    # Chosen on Beauty's validation items (best epoch, seed 0; BENCHMARKS.md): dot product with dropout 0.3
    # HR@10 .0940 / NDCG@10 .0446, ahead of cosine / 0.05 with dropout 0.5 (.0925 / .0438) and dot with 0.5
    # (.0925 / .0438). A dot product lets an item's norm carry its popularity. Refitted, under the published figures'
    # protocol (earlier items excluded) it tests at Beauty .1002 / .0608, Sports .0567 / .0329; the published SASRec +
    # sampled-softmax recipe (d 256, 1 block, 256 negatives) reached .0932 / .0555 on Beauty (BENCHMARKS.md).
    similarity: Literal["cosine", "dot"] = "dot"
    d_model: int = Field(64, gt=0)
    blocks: int = Field(2, gt=0)
    heads: int = Field(1, gt=0)
    dropout: float = Field(0.3, ge=0, lt=1)
    softmax: Literal["full", "sampled_per_sequence", "sampled_per_batch"] = "full"
    num_negatives: int = Field(128, gt=0, description="sampled softmaxes only")
    batch_size: int = Field(128, gt=0)
    lr: float = Field(2e-3, gt=0)
    max_epochs: int = Field(200, gt=0)
    patience: int = Field(5, gt=0, description="validations without a better HR@10 before stopping")
    eval_every: int = Field(2, gt=0, description="epochs between validations")
    max_minutes: float | None = Field(None, gt=0, description="time budget of the training epochs")
    # Once validation has chosen the epochs, train again that long on training + validation items (the test
    # item stays unseen) and keep that model: what a deployed retriever does with its freshest interactions.
    # It lifts Beauty's test R@10 by a fifth or more (BENCHMARKS.md); it doubles the training time.
    refit_with_validation: bool = True


class GenerativeRetrieverConfig(Section):
    """Semantic IDs of the dense model's item table (and / or item attributes), then the NEZHA retriever."""

    item_source: Literal["model", "attributes", "both"] = "model"
    sid_method: Literal["rq-kmeans", "rq-vae"] = "rq-kmeans"
    # One level of 256 balanced clusters (~48 items each on Beauty), then the item head over a cluster's items (below):
    # the 2026-12-05 default. The earlier 3 x 256 unbalanced codes: `codebooks=[256,256,256] balanced=false
    # item_head=false`.
    codebooks: list[int] = Field(default_factory=lambda: [256], min_length=1,
                                 description="codes per level, before the collision code")
    balanced: bool = True
    backbone: Literal["hstu", "transformer"] = "hstu"
    d_model: int = Field(64, gt=0)
    blocks: int = Field(2, gt=0)
    heads: int = Field(2, gt=0)
    dropout: float = Field(0.2, ge=0, lt=1)
    beam_size: int = Field(20, gt=0)
    ar_weight: float = Field(1.0, ge=0, description="weight of the backbone LM loss (the beam-search baseline)")
    # Code embeddings and output rows start at the RQ-KMeans centroids (when they are d_model wide).
    init_from_codebooks: bool = True
    # History tokens also carry the item's own embedding, started from the dense model's item table (when it
    # is d_model wide): the backbone then reads the items as the dense retriever does, not only their codes.
    # The defaults below (this, batch 512, lr 2e-3, refit, distillation 0.5) are the recipe measured on Beauty and
    # Sports (BENCHMARKS.md, retrieval): distillation + refit lifted Beauty's test R@10 from .0515 to .0644.
    history_item_embeddings: bool = True
    batch_size: int = Field(512, gt=0)
    lr: float = Field(2e-3, gt=0)
    max_epochs: int = Field(30, gt=0)
    patience: int = Field(3, gt=0)
    max_minutes: float | None = Field(None, gt=0)
    eval_users: int = Field(3000, gt=0, description="validation users decoded after every epoch")
    # As the dense section's: once validation chose the epochs, train again that long on training + validation
    # items (the test item stays unseen); doubles the training time. Beauty with distillation: .0585 -> .0644.
    refit_with_validation: bool = True
    # Distillation: each code level's loss mixes in, with this weight, the dense retriever's item distribution
    # summed per code (given the true earlier codes); 0 = off. The pipeline trains (or loads) the dense model for it
    # whatever the item_source.
    # Beauty, selected epoch: 0 -> .0508, 0.5 -> .0585, 0.9 -> .0576 test R@10 (one seed each).
    distill_weight: float = Field(0.5, ge=0, le=1)
    distill_temperature: float = Field(1.0, gt=0, description="of the dense teacher's item softmax")
    # The draft head's transition between code levels (models/nezha.py DRAFT_CELLS). GRU, our choice over the paper's
    # RNNCell: on Beauty (16-minute budgets, same teacher, all test users, beam 20) test R@10 .0521 -> .0556 (seed 0)
    # and .0473 -> .0534 (seed 1), validation +.005 / +.006; NEZHA decoding +6% (batch 1) / +12% (batch 32) slower.
    # The full recipe (distillation + refit): Beauty .0644 -> .0666 (N@10 .0324 -> .0349), Sports .0354 -> .0378.
    draft_cell: Literal["rnn", "gru"] = "gru"
    # The last level (the collision code) scored by each item's own output row, started at the dense item table
    # (models/nezha.py NezhaConfig.item_head). Beauty, the full recipe on the same teacher and 10,000 test users:
    # test R@10 .0666 -> .0895, N@10 .0349 -> .0464 (3 x 256 codes without it -> 256 balanced clusters with it),
    # level with the dense teacher (.0892 / .0426). It costs NEZHA its speed-up: with two levels there is one
    # backbone step for it to save, so NEZHA and beam search take about the same time (BENCHMARKS.md).
    item_head: bool = True


RetrievalChannel = Literal["generative", "dense", "trending"]


class RetrievalConfig(Section):
    """Both retrievers (`ray_jobs.train_retrieval`, `ray_jobs.train_retriever`, the demo, `bench.retrieval`) and
    how serving merges their candidates (serving/channels.py)."""

    max_history: int = Field(50, gt=0, description="most recent items a retriever reads per user")
    # Candidates per channel, in merge order; a channel's unused share is filled by the others, in this order.
    channels: dict[RetrievalChannel, Annotated[int, Field(ge=0)]] = Field(
        default_factory=lambda: {"generative": 100, "dense": 80, "trending": 20},
        description="the merge's share of each retrieval channel (serving.num_candidates are kept)")
    dense: DenseRetrieverConfig = Field(default_factory=DenseRetrieverConfig)
    generative: GenerativeRetrieverConfig = Field(default_factory=GenerativeRetrieverConfig)


class PlatformConfig(Section):
    profile: str = "embedded"
    # Secrets that config.load expanded from `${NAME}` references: dotted key -> (reference, value).
    _secret_references: dict[str, tuple[str, str]] = PrivateAttr(default_factory=dict)
    ray: RayConfig = Field(default_factory=RayConfig)
    lake: LakeConfig = Field(default_factory=LakeConfig)
    ingest: IngestConfig = Field(default_factory=IngestConfig)
    simulator: SimulatorConfig = Field(default_factory=SimulatorConfig)
    datasets: DatasetsConfig = Field(default_factory=DatasetsConfig)
    features: FeaturesConfig = Field(default_factory=FeaturesConfig)
    samples: SamplesConfig = Field(default_factory=SamplesConfig)
    training: TrainingConfig = Field(default_factory=TrainingConfig)
    serving: ServingConfig = Field(default_factory=ServingConfig)
    retrieval: RetrievalConfig = Field(default_factory=RetrievalConfig)

    def keep_secret_references(self, references: dict[str, tuple[str, str]]) -> None:
        """Dump these secrets as their `${NAME}` references (dotted key -> (reference, value))."""
        self._secret_references = dict(references)

    @model_serializer(mode="wrap")
    def _dump_secret_references(self, handler):
        # A dump is what rendered files are written from (the Feast repo's platform.yaml, a profile for a
        # subprocess): it names a secret by its reference, unless the value was replaced after loading.
        out = handler(self)
        for dotted, (reference, value) in self._secret_references.items():
            *sections, key = dotted.split(".")
            node = out
            for section in sections:
                node = node.get(section) if isinstance(node, dict) else None
            if isinstance(node, dict) and node.get(key) == value:
                node[key] = reference
        return out
