"""training.artifact: round trips give identical outputs; bad configs and tampered folders fail loudly."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

import training.artifact
from models.dlrm import DLRM, DLRMConfig
from models.features import RankingInputSpec
from models.genrank import GenRank
from models.heads import RankerConfig
from models.inputs import random_ranking_inputs
from models.zenith import Zenith, ZenithConfig
from training.artifact import decode_config, encode_config, load_artifact, register_config, save_artifact
from training.retrieval.dense import build_retrieval_model

REPO = Path(__file__).resolve().parents[2]


def retrieval_batch(num_items: int = 40):
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(1, num_items + 1, (3, 12), generator=g)
    ts = 1_000_000 + torch.cumsum(torch.randint(1, 5000, (3, 12), generator=g), 1)
    return ids, ts, torch.tensor([12, 5, 9])


@pytest.mark.parametrize("kind", ["hstu", "sasrec"])
def test_retrieval_round_trip_gives_identical_scores(tmp_path, kind):
    model, config = build_retrieval_model(kind, num_items=40, d_model=16, max_len=12, seed=3)
    with torch.no_grad():  # move off the initialisation so a fresh model would differ
        for p in model.parameters():
            p.add_(0.01 * torch.randn_like(p))
    model.eval()
    metadata = {"dataset": "toy", "item_vocab": list(range(41))}
    saved = save_artifact(tmp_path / "a", model, config, metadata, {"hr@10": 0.25}, name=kind)
    loaded, manifest = load_artifact(tmp_path / "a")
    assert type(loaded) is type(model) and not loaded.training
    assert manifest.version == saved.version and manifest.version.startswith(f"{kind}-")
    assert manifest.metadata == metadata and manifest.metrics == {"hr@10": 0.25}
    assert manifest.config == config and manifest.semantic_ids is None
    batch = retrieval_batch()
    assert torch.equal(loaded.score_all(*batch), model.score_all(*batch))


def test_selected_weights_are_kept_beside_the_final_ones(tmp_path):
    """A refitted retriever keeps the weights validation selected: `weights="selected"` loads them, the default the
    final ones; an artifact without them says so, and a state dict of another shape is refused at save time."""
    model, config = build_retrieval_model("sasrec", num_items=40, d_model=16, max_len=12, seed=3)
    selected = {k: v.clone() for k, v in model.state_dict().items()}
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.01 * torch.randn_like(p))
    model.eval()
    save_artifact(tmp_path / "a", model, config, selected_weights=selected)
    batch = retrieval_batch()
    final, _ = load_artifact(tmp_path / "a")
    chosen, _ = load_artifact(tmp_path / "a", weights="selected")
    assert torch.equal(final.score_all(*batch), model.score_all(*batch))
    assert all(torch.equal(v, selected[k]) for k, v in chosen.state_dict().items())
    assert not chosen.training and not torch.equal(chosen.score_all(*batch), final.score_all(*batch))
    save_artifact(tmp_path / "b", model, config)
    with pytest.raises(ValueError, match=r"no selected\.safetensors"):
        load_artifact(tmp_path / "b", weights="selected")
    with pytest.raises(ValueError, match=r"weights must be one of"):
        load_artifact(tmp_path / "b", weights="best")
    with pytest.raises(ValueError, match="selected_weights are not a state dict"):
        save_artifact(tmp_path / "c", model, config, selected_weights={"x": torch.zeros(1)})


def test_dlrm_round_trip_with_nested_dataclass_and_tuple(tmp_path):
    spec = RankingInputSpec(num_users=50, num_items=100, num_authors=20, embed_dim=8)
    config = DLRMConfig(spec, num_tasks=2, cross_rank=4, mlp_dims=(32, 16))
    torch.manual_seed(0)
    model = DLRM(config).eval()
    save_artifact(tmp_path / "dlrm", model, config, {"features": ["user", "item"]}, {"auc": 0.7})
    loaded, manifest = load_artifact(tmp_path / "dlrm")
    assert manifest.config == config and isinstance(manifest.config.features, RankingInputSpec)
    assert manifest.config.mlp_dims == (32, 16)
    stored = json.loads((tmp_path / "dlrm" / "config.json").read_text())
    assert stored["model_class"] == "DLRM"
    assert stored["config"]["fields"]["features"]["__dataclass__"] == "RankingInputSpec"
    inputs = random_ranking_inputs()
    assert torch.equal(loaded(inputs), model(inputs))


def test_configs_recorded_under_a_former_class_name_still_load():
    """Artifacts saved before the rename record the ranking inputs as `FeatureSpec`."""
    old = {"__dataclass__": "FeatureSpec", "fields": {"num_users": 50, "num_items": 100, "num_authors": 20}}
    assert decode_config(old) == RankingInputSpec(num_users=50, num_items=100, num_authors=20)


RANKERS = {
    "genrank": (GenRank, RankerConfig(num_items=100, num_actions=9, num_tasks=2, num_authors=20, cand_dense_dim=6,
                                      max_hist_len=16, d_model=16, d_qk=8, d_v=8, head_hidden=8)),
    "zenith": (Zenith, ZenithConfig.zenith_pp(
        RankingInputSpec(num_users=50, num_items=100, num_authors=20, embed_dim=8), num_tasks=2, dim=16,
        head_dims=(8,))),
}


@pytest.mark.parametrize("name", sorted(RANKERS))
def test_ranker_round_trip(tmp_path, name):
    cls, config = RANKERS[name]
    torch.manual_seed(0)
    model = cls(config).eval()
    save_artifact(tmp_path / name, model, config)
    loaded, _ = load_artifact(tmp_path / name)
    inputs = random_ranking_inputs()
    assert torch.equal(loaded(inputs), model(inputs))


def test_loads_in_a_fresh_process_from_nothing_but_a_copied_folder(tmp_path):
    model, config = build_retrieval_model("hstu", num_items=40, d_model=16, max_len=12, seed=1)
    ids = torch.arange(1, 41)[None, :, None].expand(1, 40, 3).reshape(-1, 3)[:, :2]  # [40, 3]
    semantic_ids = torch.cat([ids, torch.zeros(40, 1, dtype=torch.long)], 1)
    save_artifact(tmp_path / "orig", model, config, semantic_ids=semantic_ids)
    shutil.copytree(tmp_path / "orig", tmp_path / "elsewhere")
    shutil.rmtree(tmp_path / "orig")
    weights = load_file(str(tmp_path / "elsewhere" / "weights.safetensors"))  # plain tensors, no pickle
    assert all(isinstance(t, torch.Tensor) for t in weights.values())
    script = ("import sys, torch; from training.artifact import load_artifact; "
              "m, man = load_artifact(sys.argv[1]); "
              "print(man.model_class, tuple(man.semantic_ids.shape), sum(p.numel() for p in m.parameters()))")
    out = subprocess.run([sys.executable, "-c", script, str(tmp_path / "elsewhere")], cwd=REPO,
                         capture_output=True, text=True, check=True).stdout.split()
    assert out == ["HSTURetrieval", "(40,", "3)", str(sum(p.numel() for p in model.parameters()))]


def test_tampered_weights_fail_the_checksum(tmp_path):
    model, config = build_retrieval_model("sasrec", num_items=10, d_model=8, max_len=6)
    save_artifact(tmp_path / "a", model, config)
    weights = tmp_path / "a" / "weights.safetensors"
    data = bytearray(weights.read_bytes())
    data[-1] ^= 0xFF
    weights.write_bytes(bytes(data))
    with pytest.raises(ValueError, match="sha256"):
        load_artifact(tmp_path / "a")


def test_save_refuses_bad_configs_and_existing_folders(tmp_path):
    model, config = build_retrieval_model("sasrec", num_items=10, d_model=8, max_len=6)
    with pytest.raises(ValueError, match="does not rebuild"):
        save_artifact(tmp_path / "wrong", model, {**config, "num_items": 11})
    assert not (tmp_path / "wrong").exists()
    assert not any(p.name.startswith(".") for p in tmp_path.iterdir())  # no temporary folder left behind
    save_artifact(tmp_path / "a", model, config)
    with pytest.raises(FileExistsError):
        save_artifact(tmp_path / "a", model, config)
    with pytest.raises(TypeError, match="not registered"):
        save_artifact(tmp_path / "b", torch.nn.Linear(2, 2), {"in_features": 2, "out_features": 2})


def test_config_encoding_round_trips_and_rejects_unknown_types():
    @dataclass
    class Inner:
        dims: tuple[int, ...] = (1, 2)
        rate: float | None = None

    with pytest.raises(TypeError, match="not registered"):
        encode_config(Inner())
    register_config(Inner)
    try:
        value = {"inner": Inner(dims=(3,), rate=0.5), "nested": [(1, "a"), {"k": None}], "flag": True}
        encoded = encode_config(value)
        assert decode_config(json.loads(json.dumps(encoded))) == value
    finally:
        del training.artifact.CONFIG_CLASSES["Inner"]
    with pytest.raises(ValueError, match="unknown config class"):
        decode_config(encoded)
    with pytest.raises(TypeError, match=r"config\.t: cannot store a Tensor"):
        encode_config({"t": torch.zeros(1)})
