"""Artefact files: the same content is the same bytes, a failed write leaves nothing, provenance and checksums
are checked."""
import hashlib

import pytest
import torch

from fut.storage import ArtefactMismatch, CorruptArtefact, atomic_write_text, load_tensors, read_metadata, save_tensors


def test_same_tensors_and_metadata_give_identical_bytes(tmp_path):
    meta = {f"key{i}": {"value": i, "list": [i, i + 1]} for i in range(12)}   # many keys: hash order varies
    digests = set()
    for i in range(6):
        save_tensors(tmp_path / f"{i}.safetensors", {"b": torch.ones(3), "a": torch.arange(4.0)}, meta)
        digests.add(hashlib.sha256((tmp_path / f"{i}.safetensors").read_bytes()).hexdigest())
    assert len(digests) == 1
    assert read_metadata(tmp_path / "0.safetensors") == meta


def test_failed_write_leaves_no_file_and_no_temporary(tmp_path):
    with pytest.raises(TypeError):
        atomic_write_text(tmp_path / "x.txt", 42)          # not text: the write fails midway
    assert list(tmp_path.iterdir()) == []


def test_load_refuses_metadata_of_another_run(tmp_path):
    save_tensors(tmp_path / "a.safetensors", {"x": torch.zeros(2)}, {"params_hash": "abc"})
    tensors, meta = load_tensors(tmp_path / "a.safetensors", {"params_hash": "abc"})
    assert torch.equal(tensors["x"], torch.zeros(2)) and meta == {"params_hash": "abc"}
    with pytest.raises(ArtefactMismatch, match="'params_hash' is 'abc' but this run needs 'xyz'"):
        load_tensors(tmp_path / "a.safetensors", {"params_hash": "xyz"})


def test_refusal_names_every_provenance_difference(tmp_path):
    meta = {"dtype": "float32", "tokenizer_sha256": "aa", "t": 1}
    save_tensors(tmp_path / "a.safetensors", {"x": torch.zeros(2)}, meta)
    with pytest.raises(ArtefactMismatch) as err:
        load_tensors(tmp_path / "a.safetensors", {"dtype": "bfloat16", "tokenizer_sha256": "bb", "t": 1})
    assert "dtype [metadata 'dtype' is 'float32' but this run needs 'bfloat16']" in str(err.value)
    assert "tokenizer [metadata 'tokenizer_sha256' is 'aa' but this run needs 'bb']" in str(err.value)


def test_a_file_without_checksums_is_refused(tmp_path):
    from safetensors.torch import save_file

    save_file({"x": torch.zeros(2)}, str(tmp_path / "old.safetensors"), metadata={"fut": "{}"})
    with pytest.raises(CorruptArtefact, match="old.safetensors has no tensor checksums"):
        load_tensors(tmp_path / "old.safetensors")
