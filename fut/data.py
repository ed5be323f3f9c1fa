"""Tokenizer training (or a pretrained model's own tokenizer), packing into fixed-length sequences, and the splits
every stage reads.

Splits (per domain, from a seeded shuffle of that domain's sequences): an eval set, the window pool and the
warm-start pool, disjoint. The window is T batches of b sequences; with `window.batches: domain` batch j is
drawn from domain j mod D (domain-pure batches, the reference order interleaves domains), with `mixed` every
batch mixes all domains.
"""
from __future__ import annotations

import hashlib
from dataclasses import dataclass
from pathlib import Path

import torch

from . import pretrained
from .config import SPECIAL_TOKENS, ConfigError, Params
from .storage import load_tensors, save_tensors, versions

EOS = SPECIAL_TOKENS[0]
SPLITS_FILE = "splits.safetensors"
TOKENIZER_DIR = "tokenizer"
PREPARE_SECTIONS = ("corpus", "tokenizer", "data")


def prepare_hash(params: Params) -> str:
    """Provenance of the prepared data: corpus, tokenizer and data sections plus the window's shape, and a
    pretrained checkpoint's tokenizer and config by their contents."""
    w = params.window
    own = params.section_hash(*PREPARE_SECTIONS) + f"-T{w.steps}-b{w.batch_size}-{w.batches}-s{w.seed}"
    if params.model.pretrained is None:
        return own
    return own + "-" + pretrained.digest(Path(params.model.pretrained), weights=False)


def train_tokenizer(domain_files: dict[str, Path], vocab_size: int, min_frequency: int, out_dir: Path):
    from tokenizers import ByteLevelBPETokenizer
    from transformers import PreTrainedTokenizerFast

    bpe = ByteLevelBPETokenizer()
    bpe.train([str(p) for p in domain_files.values()], vocab_size=vocab_size, min_frequency=min_frequency,
              special_tokens=list(SPECIAL_TOKENS), show_progress=False)
    tok = PreTrainedTokenizerFast(tokenizer_object=bpe._tokenizer, eos_token=EOS)
    tok.save_pretrained(str(out_dir))
    return tok


def checkpoint_tokenizer(checkpoint: Path, out_dir: Path):
    """A pretrained model's own tokenizer, saved where a trained one goes: every later stage reads it alike."""
    tok = pretrained.load_tokenizer(checkpoint)
    tok.save_pretrained(str(out_dir))
    return tok


def embedding_rows(params: Params, tokenizer) -> int:
    """Rows of the model's input embedding: the trained tokenizer's size, or the pretrained model's own."""
    if params.model.pretrained is None:
        return len(tokenizer)
    return pretrained.vocab_rows(Path(params.model.pretrained))


def check_token_ids(packed: dict[str, torch.Tensor], vocab: int, params: Params) -> None:
    """A pretrained tokenizer may know tokens the model has no embedding row for."""
    top = max((int(seqs.max()) for seqs in packed.values() if seqs.numel()), default=-1)
    if top >= vocab:
        raise ConfigError(f"params: model.pretrained = {params.model.pretrained!r} is not allowed; expected a "
                          f"tokenizer whose ids fit the model's {vocab} embedding rows, but the text has id {top}")


def load_tokenizer(path: Path):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(str(path))


def pack_domains(domain_files: dict[str, Path], tokenizer, seq_len: int) -> dict[str, torch.Tensor]:
    """Tokenize paragraphs with `datasets`, join them with EOS and cut each domain into [N, seq_len] rows."""
    import datasets

    raw = datasets.load_dataset("text", data_files={d: str(p) for d, p in domain_files.items()},
                                sample_by="paragraph")
    eos = tokenizer.eos_token_id
    tokenized = raw.map(lambda b: {"ids": [x + [eos] for x in tokenizer(b["text"])["input_ids"]]},
                        batched=True, remove_columns=["text"], desc="tokenize")
    packed = {}
    for d in domain_files:
        stream = torch.tensor([t for row in tokenized[d]["ids"] for t in row], dtype=torch.int64)
        n = stream.numel() // seq_len
        packed[d] = stream[: n * seq_len].view(n, seq_len)
    return packed


def window_plan(domains: list[str], params: Params) -> list[int]:
    """Domain index of each window batch (-1 for mixed batches)."""
    w = params.window
    if w.batches == "mixed":
        return [-1] * w.steps
    return [j % len(domains) for j in range(w.steps)]


def split(packed: dict[str, torch.Tensor], params: Params) -> dict[str, torch.Tensor]:
    domains = list(packed)
    w, e = params.window, params.data.eval_sequences_per_domain
    plan = window_plan(domains, params)
    gen = torch.Generator().manual_seed(params.data.seed)
    need = {d: (w.steps * w.batch_size + len(domains) - 1) // len(domains) if w.batches == "mixed"
            else plan.count(i) * w.batch_size for i, d in enumerate(domains)}
    out, pools, warm = {}, {}, []
    for d, seqs in packed.items():
        have = seqs.shape[0] - e
        if have < need[d]:
            raise ConfigError(
                f"params: window.batch_size = {w.batch_size} with window.steps = {w.steps} needs {need[d]} sequences "
                f"of domain {d!r} beyond its {e} eval sequences, but it has only {seqs.shape[0]} of "
                f"data.seq_len = {params.data.seq_len} tokens; lower window.batch_size, window.steps or "
                f"data.eval_sequences_per_domain, or raise corpus.max_chars_per_domain")
        seqs = seqs[torch.randperm(seqs.shape[0], generator=gen)]
        out[f"eval.{d}"] = seqs[:e]
        pools[d] = seqs[e: e + need[d]]
        warm.append(seqs[e + need[d]:])
    if w.batches == "mixed":
        pool = torch.cat(list(pools.values()))
        pool = pool[torch.randperm(pool.shape[0], generator=gen)][: w.steps * w.batch_size]
        out["window"] = pool.view(w.steps, w.batch_size, -1)
    else:
        taken = {d: 0 for d in domains}
        batches = []
        for i in plan:
            d = domains[i]
            batches.append(pools[d][taken[d]: taken[d] + w.batch_size])
            taken[d] += w.batch_size
        out["window"] = torch.stack(batches)
    out["warmstart"] = torch.cat(warm)
    return out


@dataclass
class Prepared:
    """What the prepare stage produced, as the training stages read it."""
    window: torch.Tensor                 # [T, b, L]
    warmstart: torch.Tensor              # [N, L]
    eval_sets: dict[str, torch.Tensor]   # domain -> [E, L]
    domains: list[str]
    window_domains: list[int]            # domain index per window batch, -1 = mixed
    vocab_size: int
    eos_id: int
    prepare_hash: str
    tokenizer_sha256: str

    @property
    def eval_mixed(self) -> torch.Tensor:
        return torch.cat([self.eval_sets[d] for d in self.domains])


def write_prepared(out_dir: Path, tensors: dict[str, torch.Tensor], domains: list[str], plan: list[int],
                   tokenizer, vocab: int, params: Params) -> None:
    tok_json = (out_dir / TOKENIZER_DIR / "tokenizer.json").read_bytes()
    save_tensors(out_dir / SPLITS_FILE, tensors, {
        "prepare_hash": prepare_hash(params), "domains": domains, "window_domains": plan,
        "vocab_size": vocab, "eos_id": tokenizer.eos_token_id,
        "tokenizer_sha256": hashlib.sha256(tok_json).hexdigest(), "versions": versions()})


def load_prepared(data_dir: Path, params: Params) -> Prepared:
    tensors, meta = load_tensors(Path(data_dir) / SPLITS_FILE, {"prepare_hash": prepare_hash(params)})
    domains = meta["domains"]
    return Prepared(window=tensors["window"], warmstart=tensors["warmstart"],
                    eval_sets={d: tensors[f"eval.{d}"] for d in domains}, domains=domains,
                    window_domains=meta["window_domains"], vocab_size=meta["vocab_size"], eos_id=meta["eos_id"],
                    prepare_hash=meta["prepare_hash"], tokenizer_sha256=meta["tokenizer_sha256"])
