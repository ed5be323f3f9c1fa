"""Stage `prepare`: corpus text per domain, the BPE tokenizer (or a pretrained model's own), and the packed
splits."""
from __future__ import annotations

from pathlib import Path

from .. import corpus, data
from ..config import Params
from ..device import resolve_device
from ..model import check_seq_len


def run(params: Params, out_dir: Path) -> dict:
    resolve_device(params.train)   # a GPU profile on a machine without a GPU is refused before any work
    if params.model.pretrained is not None:
        check_seq_len(params.model, params.data.seq_len)
    out_dir = Path(out_dir)
    files = corpus.write_domains(params.corpus, out_dir / "corpus", params.data.seed)
    if params.model.pretrained is None:
        tokenizer = data.train_tokenizer(files, params.tokenizer.vocab_size, params.tokenizer.min_frequency,
                                         out_dir / data.TOKENIZER_DIR)
    else:
        tokenizer = data.checkpoint_tokenizer(Path(params.model.pretrained), out_dir / data.TOKENIZER_DIR)
    packed = data.pack_domains(files, tokenizer, params.data.seq_len)
    vocab = data.embedding_rows(params, tokenizer)
    data.check_token_ids(packed, vocab, params)
    splits = data.split(packed, params)
    domains = list(files)
    data.write_prepared(out_dir, splits, domains, data.window_plan(domains, params), tokenizer, vocab,
                        params)
    return {"domains": domains, "vocab_size": vocab,
            "sequences_per_domain": {d: int(packed[d].shape[0]) for d in domains},
            "tokens_per_domain": {d: int(packed[d].numel()) for d in domains},
            "warmstart_sequences": int(splits["warmstart"].shape[0]),
            "window_shape": list(splits["window"].shape),
            "missing_domains": [d for d in params.corpus.sources if d not in files]}
