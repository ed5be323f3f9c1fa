"""A user's own checkpoint (`model.pretrained`): tiny checkpoints this file writes with save_pretrained (a Llama
with untied embeddings, a GPT-2 with tied ones and more embedding rows than tokens) go through the pipeline, the
window starts from their weights exactly, and unusable folders are refused at config load."""
import dataclasses
import json
import math
import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file
from transformers import GPT2Config, GPT2LMHeadModel, LlamaConfig, LlamaForCausalLM

from checks.tiny import tiny_params
from fut import config, data
from fut.estimators import EstimationContext, estimate
from fut.model import build_model, count_parameters
from fut.pretrained import load_tokenizer
from fut.reference import ReferenceRun, load_checkpoint, reference_hash
from fut.stages import cache, estimate as estimate_stage, groundtruth, prepare, projection, reference
from fut.storage import ArtefactMismatch

SAMPLE = "In the beginning, God created the heavens and the earth."


def write_checkpoint(folder: Path, text_dir: Path, arch: str) -> Path:
    """A tiny random model of `arch` and a byte-level BPE trained on the tiny text, saved side by side."""
    tok = data.train_tokenizer({"text": text_dir / "genesis.txt"}, 300, 2, folder)
    torch.manual_seed(0)
    if arch == "llama":
        model = LlamaForCausalLM(LlamaConfig(
            vocab_size=len(tok), hidden_size=16, intermediate_size=32, num_hidden_layers=1, num_attention_heads=2,
            num_key_value_heads=2, max_position_embeddings=32, tie_word_embeddings=False,
            bos_token_id=tok.eos_token_id, eos_token_id=tok.eos_token_id))
    else:   # tied embeddings, rows beyond the tokenizer's ids, and dropout that must be switched off
        model = GPT2LMHeadModel(GPT2Config(
            vocab_size=len(tok) + 12, n_embd=16, n_layer=1, n_head=2, n_positions=32, resid_pdrop=0.5,
            bos_token_id=tok.eos_token_id, eos_token_id=tok.eos_token_id))
    model.save_pretrained(folder)
    return folder


def pretrained_params(params_dict: dict, checkpoint: Path) -> dict:
    params_dict["model"]["pretrained"] = str(checkpoint)
    params_dict["warmstart"]["enabled"] = False
    params_dict["groundtruth"].update(n_random=2, structured=["reversed"], trajectories=2)
    params_dict["estimate"].update(methods=["naive", "fut-subspace", "fut:secant"], default="fut-subspace")
    params_dict["memorization"]["methods"] = ["fut:secant"]
    return params_dict


@pytest.fixture(scope="module", params=["llama", "gpt2"])
def pipeline(request, text_dir, tmp_path_factory):
    """prepare → reference → ground truth → cache → projection → estimate from one checkpoint."""
    root = tmp_path_factory.mktemp(request.param)
    checkpoint = write_checkpoint(root / "checkpoint", text_dir, request.param)
    params = config.from_dict(pretrained_params(tiny_params(text_dir), checkpoint))
    dirs = {s: root / s for s in ("prepared", "reference", "groundtruth", "cache", "projection")}
    prepared = prepare.run(params, dirs["prepared"])
    _, ref_metrics = reference.run(params, dirs["prepared"], dirs["reference"])
    groundtruth.run(params, dirs["prepared"], dirs["reference"], dirs["groundtruth"])
    cache.run(params, dirs["prepared"], dirs["reference"], dirs["cache"])
    projection.run(params, dirs["prepared"], dirs["reference"], dirs["cache"], dirs["projection"])
    results, est_metrics = estimate_stage.run(params, dirs["prepared"], dirs["reference"], dirs["cache"],
                                              dirs["projection"], dirs["groundtruth"])
    return {"params": params, "checkpoint": checkpoint, "dirs": dirs, "prepare": prepared,
            "reference": ref_metrics, "estimate": (results, est_metrics)}


def test_prepare_uses_the_checkpoints_tokenizer_and_embedding_rows(pipeline):
    prepared = data.load_prepared(pipeline["dirs"]["prepared"], pipeline["params"])
    theirs = load_tokenizer(pipeline["checkpoint"])
    ours = data.load_tokenizer(pipeline["dirs"]["prepared"] / data.TOKENIZER_DIR)
    assert ours(SAMPLE)["input_ids"] == theirs(SAMPLE)["input_ids"]
    rows = json.loads((pipeline["checkpoint"] / "config.json").read_text())["vocab_size"]
    assert prepared.vocab_size == pipeline["prepare"]["vocab_size"] == rows
    assert prepared.eos_id == theirs.eos_token_id
    assert int(prepared.window.max()) < rows


def test_the_window_starts_from_the_checkpoints_weights_exactly(pipeline):
    params, dirs = pipeline["params"], pipeline["dirs"]
    prepared = data.load_prepared(dirs["prepared"], params)
    theta0 = load_checkpoint(dirs["reference"], 0, reference_hash(params, prepared)).theta
    stored = load_file(pipeline["checkpoint"] / "model.safetensors")
    assert set(theta0) == set(stored)       # a tied lm_head is stored once, as the checkpoint stores it
    assert all(torch.equal(theta0[k], stored[k]) for k in stored)
    assert count_parameters(params.model, prepared.vocab_size, params.data.seq_len) == sum(
        t.numel() for t in stored.values())
    assert pipeline["reference"]["identity_retrain_bitwise"] is True


def test_the_identity_order_is_the_reference_and_estimates_are_finite(pipeline):
    params, dirs = pipeline["params"], pipeline["dirs"]
    ctx = EstimationContext(ReferenceRun(params, dirs["prepared"], dirs["reference"]), dirs["cache"],
                            dirs["projection"])
    for method in params.estimate.methods:
        assert float(estimate(ctx, [list(range(ctx.T))], method).eval_loss[0]) == ctx.naive_loss
    results, metrics = pipeline["estimate"]
    losses = [r["est_loss"] for r in results["per_order"]]
    assert losses and all(math.isfinite(x) for x in losses)
    assert math.isfinite(metrics["naive_eval_loss"]) and metrics["test"]["n_orders"] > 0


def test_provenance_follows_the_checkpoints_contents(pipeline, tmp_path):
    """A copy of the checkpoint prepares the same data; new weights make the stored reference run foreign."""
    params, dirs = pipeline["params"], pipeline["dirs"]
    copy = Path(shutil.copytree(pipeline["checkpoint"], tmp_path / "copy"))
    moved = config.from_dict({**dataclasses.asdict(params),
                              "model": {**dataclasses.asdict(params.model), "pretrained": str(copy)}})
    prepared = data.load_prepared(dirs["prepared"], moved)      # same tokenizer and config: same prepared data
    before = reference_hash(moved, prepared)
    weights = load_file(copy / "model.safetensors")
    name = sorted(weights)[0]
    weights[name] = weights[name] + 1.0
    save_file(weights, copy / "model.safetensors", metadata={"format": "pt"})
    assert data.load_prepared(dirs["prepared"], moved).prepare_hash == prepared.prepare_hash
    assert reference_hash(moved, prepared) != before
    with pytest.raises(ArtefactMismatch, match="reference_hash"):
        ReferenceRun(moved, dirs["prepared"], dirs["reference"])


@pytest.fixture(scope="module")
def llama_checkpoint(text_dir, tmp_path_factory) -> Path:
    return write_checkpoint(tmp_path_factory.mktemp("llama_ckpt"), text_dir, "llama")


def broken(llama_checkpoint: Path, tmp_path: Path, how: str) -> Path:
    folder = Path(shutil.copytree(llama_checkpoint, tmp_path / "checkpoint"))
    cfg = json.loads((folder / "config.json").read_text())
    if how == "missing":
        shutil.rmtree(folder)
    elif how == "pickled":   # invalid bytes: opening them as a pickle would fail with another error
        (folder / "model.safetensors").unlink()
        (folder / "pytorch_model.bin").write_bytes(b"\x80\x04not a pickle")
    elif how == "auto_map":
        cfg["auto_map"] = {"AutoModelForCausalLM": "modeling_evil.EvilForCausalLM"}
    elif how == "model_type":
        cfg["model_type"] = "no_such_model"
    elif how == "no_config":
        (folder / "config.json").unlink()
    elif how == "no_tokenizer":
        (folder / "tokenizer.json").unlink()
    if how in ("auto_map", "model_type"):
        (folder / "config.json").write_text(json.dumps(cfg))
    return folder


@pytest.mark.parametrize("how, needle", [
    ("missing", "an existing folder"),
    ("no_config", "valid config.json"),
    ("pickled", r"\*\.safetensors weights in the folder \(pytorch_model\.bin refused: loading a pickled "
                r"checkpoint can run code\).*safe_serialization=True"),
    ("auto_map", "config.json has auto_map.*trust_remote_code stays off"),
    ("model_type", "not 'no_such_model'.*MODEL_FOR_CAUSAL_LM_MAPPING_NAMES"),
    ("no_tokenizer", "the checkpoint's tokenizer beside it"),
])
def test_an_unusable_checkpoint_is_refused_at_config_load(params_dict, llama_checkpoint, tmp_path, monkeypatch,
                                                          how, needle):
    folder = broken(llama_checkpoint, tmp_path, how)
    monkeypatch.setattr(torch, "load", lambda *a, **k: pytest.fail("a pickled checkpoint was opened"))
    with pytest.raises(config.ConfigError, match=rf"model\.pretrained = '{folder}' is not allowed; expected .*"
                                                 + needle):
        config.from_dict(pretrained_params(params_dict, folder))


def test_a_tokenizer_without_eos_is_refused(params_dict, llama_checkpoint, tmp_path):
    folder = Path(shutil.copytree(llama_checkpoint, tmp_path / "checkpoint"))
    tok = load_tokenizer(folder)
    tok.eos_token = None
    tok.save_pretrained(folder)
    with pytest.raises(config.ConfigError, match="model.pretrained = .* a tokenizer with an EOS token"):
        config.from_dict(pretrained_params(params_dict, folder))


def test_seq_len_beyond_the_models_positions_is_refused_before_any_work(params_dict, llama_checkpoint, tmp_path):
    params_dict["data"]["seq_len"] = 33
    params = config.from_dict(pretrained_params(params_dict, llama_checkpoint))
    with pytest.raises(config.ConfigError, match=r"data\.seq_len = 33 is not allowed; expected an int <= 32, the "
                                                 r"max_position_embeddings of model\.pretrained"):
        prepare.run(params, tmp_path / "prepared")
    assert not (tmp_path / "prepared").exists()


def test_weights_the_checkpoint_lacks_are_refused(params_dict, llama_checkpoint, tmp_path):
    folder = Path(shutil.copytree(llama_checkpoint, tmp_path / "checkpoint"))
    weights = load_file(folder / "model.safetensors")
    del weights["lm_head.weight"]
    save_file(weights, folder / "model.safetensors", metadata={"format": "pt"})
    params = config.from_dict(pretrained_params(params_dict, folder))
    with pytest.raises(config.ConfigError, match=r"safetensors lack lm_head\.weight \(they would start random\)"):
        build_model(params.model, 300, params.data.seq_len)


def test_a_pickled_file_beside_the_safetensors_is_never_read(params_dict, llama_checkpoint, tmp_path, monkeypatch):
    folder = Path(shutil.copytree(llama_checkpoint, tmp_path / "checkpoint"))
    (folder / "pytorch_model.bin").write_bytes(b"\x80\x04not a pickle")
    monkeypatch.setattr(torch, "load", lambda *a, **k: pytest.fail("a pickled checkpoint was opened"))
    params = config.from_dict(pretrained_params(params_dict, folder))
    model = build_model(params.model, 300, params.data.seq_len)
    stored = load_file(folder / "model.safetensors")
    assert all(torch.equal(p, stored[k]) for k, p in model.named_parameters())
