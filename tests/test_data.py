"""Training data pipeline: corpus reading, splitting, packing, the resumable loader and BPE.

Expected values are written out by hand (or come straight from the documented torch recipe),
never from the code under test.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from skymoe.checkpoint.tokenizer import Tokenizer
from skymoe.errors import DataError
from skymoe.train.bpe import train_bpe_tokenizer
from skymoe.train.data import (SequenceLoader, pack_documents, read_documents, split_documents,
                               tokenize_documents)


def _write(path: Path, content: str | bytes) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    if isinstance(content, bytes):
        path.write_bytes(content)
    else:
        path.write_text(content, encoding="utf-8")
    return path


def _parquet(path: Path, columns: dict) -> Path:
    import pyarrow as pa
    import pyarrow.parquet as pq

    pq.write_table(pa.table(columns), path)
    return path


def _data_error(*args, **kwargs) -> str:
    """Run read_documents expecting a one-line DataError; return its message."""
    with pytest.raises(DataError) as info:
        read_documents(*args, **kwargs)
    message = str(info.value)
    assert "\n" not in message
    return message


# ------------------------------------------------------------------------------------- reading

def test_text_file_is_one_document_verbatim(tmp_path):
    text = "line one\n    indented ünï 🤗\n\nlast"
    assert read_documents([_write(tmp_path / "a.txt", text)]) == [text]


def test_directory_walk_sorted_filtered_hidden_skipped(tmp_path):
    root = tmp_path / "corpus"
    _write(root / "b.txt", "B")
    _write(root / "a.txt", "A")
    _write(root / "aa" / "d.txt", "D")  # ('a.txt',) < ('aa', 'd.txt') < ('b.txt',)
    _write(root / "sub" / "deep" / "c.txt", "C")
    _write(root / "notes.md", "M")
    _write(root / "skip.bin", "X")
    _write(root / ".hidden.txt", "hidden file")
    _write(root / ".git" / "h.txt", "hidden dir")
    _write(root / "__pycache__" / "p.txt", "cache")
    # Sorted on path components: ('a.txt',) < ('aa', 'd.txt') < ('b.txt',) < ('notes.md',) ...
    assert read_documents([root], patterns=("*.txt",)) == ["A", "D", "B", "C"]
    assert read_documents([root], patterns=("*.md", "[abcd].txt")) == ["A", "D", "B", "M", "C"]
    assert read_documents([root]) == ["A", "D", "B", "M", "X", "C"]


def test_sources_are_concatenated_in_order(tmp_path):
    first = _write(tmp_path / "z.txt", "Z")
    second = _write(tmp_path / "dir" / "a.txt", "A")
    assert read_documents([first, second.parent]) == ["Z", "A"]
    assert read_documents([str(second.parent), str(first)]) == ["A", "Z"]


def test_jsonl_documents(tmp_path):
    path = _write(tmp_path / "d.jsonl", "\n".join([
        json.dumps({"text": "first", "id": 1}),
        "",
        "   ",
        json.dumps({"text": "   "}),  # whitespace-only document: dropped
        json.dumps({"text": "has\u2028line sep"}, ensure_ascii=False),  # must stay one line
        json.dumps({"body": "x", "text": "ünï 🤗\nnext"}),
    ]) + "\n")
    assert read_documents([path]) == ["first", "has\u2028line sep", "ünï 🤗\nnext"]


def test_jsonl_custom_text_field(tmp_path):
    path = _write(tmp_path / "d.jsonl", '{"content": "a"}\n{"content": "b"}\n')
    assert read_documents([path], text_field="content") == ["a", "b"]


def test_parquet_documents(tmp_path):
    path = _parquet(tmp_path / "d.parquet", {
        "id": [1, 2, 3, 4, 5], "text": ["alpha", None, "", "gamma 🤗", "  "]})
    assert read_documents([path]) == ["alpha", "gamma 🤗"]


def test_mixed_directory(tmp_path):
    _write(tmp_path / "a.jsonl", '{"text": "j1"}\n{"text": "j2"}\n')
    _parquet(tmp_path / "b.parquet", {"text": ["p1"]})
    _write(tmp_path / "c.txt", "t1")
    assert read_documents([tmp_path]) == ["j1", "j2", "p1", "t1"]


# -------------------------------------------------------------------------------------- errors

def test_missing_path(tmp_path):
    missing = tmp_path / "nope"
    assert str(missing) in _data_error([missing])


@pytest.mark.parametrize("content", ["", "  \n\t\n"])
def test_empty_file(tmp_path, content):
    path = _write(tmp_path / "e.txt", content)
    message = _data_error([path])
    assert str(path) in message and "empty" in message


def test_empty_files_inside_a_directory_are_skipped(tmp_path):
    _write(tmp_path / "a.txt", "fine")
    _write(tmp_path / "b.txt", "")  # like a package's empty __init__.py
    assert read_documents([tmp_path]) == ["fine"]
    _write(tmp_path / "a.txt", " \n")
    message = _data_error([tmp_path])
    assert str(tmp_path) in message and "empty" in message


def test_jsonl_with_only_blank_texts_is_empty(tmp_path):
    path = _write(tmp_path / "e.jsonl", '\n{"text": ""}\n\n')
    assert "empty" in _data_error([path])


def test_empty_directory(tmp_path):
    (tmp_path / "empty").mkdir()
    _write(tmp_path / "other" / "x.md", "markdown")
    assert str(tmp_path / "empty") in _data_error([tmp_path / "empty"])
    message = _data_error([tmp_path / "other"], patterns=("*.txt",))
    assert str(tmp_path / "other") in message and "*.txt" in message


def test_directory_with_only_hidden_files(tmp_path):
    _write(tmp_path / ".git" / "a.txt", "x")
    _write(tmp_path / ".b.txt", "x")
    assert "no files matching" in _data_error([tmp_path])


def test_no_sources():
    assert "empty" in _data_error([])


def test_non_utf8_file(tmp_path):
    path = _write(tmp_path / "model.bin", b"ok\xff\xfe\x00binary")
    message = _data_error([tmp_path])
    assert str(path) in message and "not UTF-8" in message and "patterns" in message


def test_non_utf8_jsonl(tmp_path):
    path = _write(tmp_path / "d.jsonl", b'{"text": "\xff"}\n')
    message = _data_error([path])
    assert str(path) in message and "not UTF-8" in message


def test_bad_json_line_names_its_line(tmp_path):
    path = _write(tmp_path / "d.jsonl", '{"text": "a"}\n\n{"text": "b",\n{"text": "c"}\n')
    message = _data_error([path])
    assert f"{path}:3:" in message and "not valid JSON" in message


@pytest.mark.parametrize("line", ['{"body": "a"}', '{"text": 5}', '["text"]', '"text"',
                                  '{"text": null}'])
def test_jsonl_line_without_string_text(tmp_path, line):
    path = _write(tmp_path / "d.jsonl", '{"text": "ok"}\n' + line + "\n")
    message = _data_error([path])
    assert f"{path}:2:" in message and "'text'" in message


def test_truncated_parquet(tmp_path):
    path = _parquet(tmp_path / "d.parquet", {"text": [f"document {i}" for i in range(100)]})
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])
    message = _data_error([path])
    assert str(path) in message and "Parquet" in message


def test_garbage_parquet(tmp_path):
    path = _write(tmp_path / "d.parquet", b"this is not parquet at all" * 10)
    assert "Parquet" in _data_error([path])


def test_parquet_missing_column(tmp_path):
    path = _parquet(tmp_path / "d.parquet", {"content": ["a"], "id": [1]})
    message = _data_error([path])
    assert str(path) in message and "'text'" in message and "content" in message


def test_parquet_non_string_column(tmp_path):
    path = _parquet(tmp_path / "d.parquet", {"text": [1, 2]})
    assert "not string" in _data_error([path])


# ------------------------------------------------------------------------------------ splitting

DOCS = [f"doc{i}" for i in range(10)]


def test_split_sizes_disjoint_and_ordered():
    train, val = split_documents(DOCS, 0.2, seed=0)
    assert len(val) == 2 and len(train) == 8
    assert set(train).isdisjoint(val) and set(train) | set(val) == set(DOCS)
    assert train == sorted(train, key=DOCS.index) and val == sorted(val, key=DOCS.index)


def test_split_follows_seeded_permutation():
    perm = torch.randperm(10, generator=torch.Generator().manual_seed(7)).tolist()
    expected_val = [DOCS[i] for i in sorted(perm[:3])]
    assert split_documents(DOCS, 0.3, seed=7)[1] == expected_val


def test_split_is_deterministic_and_seed_dependent():
    assert split_documents(DOCS, 0.3, seed=3) == split_documents(list(DOCS), 0.3, seed=3)
    vals = {tuple(split_documents(DOCS, 0.3, seed=s)[1]) for s in range(5)}
    assert len(vals) > 1


def test_split_edge_cases():
    assert split_documents(DOCS, 0.0, seed=0) == (DOCS, [])
    assert len(split_documents(DOCS, 0.01, seed=0)[1]) == 1  # at least one held out
    assert split_documents(["only"], 0.5, seed=0) == (["only"], [])
    train, val = split_documents(["a", "b"], 0.9, seed=0)  # round(1.8) = 2, but keep one
    assert len(train) == 1 and len(val) == 1
    for bad in (1.0, -0.1, 1.5):
        with pytest.raises(DataError):
            split_documents(DOCS, bad, seed=0)


# -------------------------------------------------------------------------------------- packing

def test_pack_by_hand():
    packed = pack_documents([[1, 2], [3]], seq_len=2, eos_id=9)  # stream 1 2 9 3 9 -> tail 9
    assert packed.dtype == torch.int64
    assert packed.tolist() == [[1, 2], [9, 3]]


def test_pack_multiple_rows_from_generator():
    packed = pack_documents((d for d in [[1, 2, 3], [4], [], [5, 6]]), seq_len=3, eos_id=0)
    # stream: 1 2 3 0 4 0 0 5 6 0 -> rows of 3, tail [0] dropped
    assert packed.tolist() == [[1, 2, 3], [0, 4, 0], [0, 5, 6]]


def test_pack_too_short():
    with pytest.raises(DataError) as info:
        pack_documents([[1, 2]], seq_len=8, eos_id=0)
    message = str(info.value)
    assert "3 tokens" in message and "seq_len=8" in message


# --------------------------------------------------------------------------------------- loader

def _rows(n: int) -> torch.Tensor:
    """Row i is [i, 1000 + i], so a batch's first column names its rows."""
    return torch.stack([torch.arange(n), torch.arange(n) + 1000], dim=1)


def _ids(batch: torch.Tensor) -> list[int]:
    assert batch.dtype == torch.int64
    assert (batch[:, 1] == batch[:, 0] + 1000).all()  # whole rows, not mixed up
    return batch[:, 0].tolist()


def test_loader_visits_every_sequence_once_per_epoch():
    loader = SequenceLoader(_rows(12), batch_size=3, seed=5)
    for epoch in range(3):
        seen = []
        for _ in range(4):
            assert loader.epoch == epoch
            batch = loader.next_batch()
            assert batch.shape == (3, 2)
            seen += _ids(batch)
        assert sorted(seen) == list(range(12))
        expected = torch.randperm(12, generator=torch.Generator().manual_seed(5 + epoch))
        assert seen == expected.tolist()


def test_loader_drops_incomplete_batch_and_reshuffles():
    loader = SequenceLoader(_rows(10), batch_size=4, seed=0)
    epoch0 = _ids(loader.next_batch())
    assert loader.epoch == 0 and loader.state_dict() == {"epoch": 0, "position": 4}
    epoch0 += _ids(loader.next_batch())
    # Only 2 rows left, not a full batch: the next batch already comes from epoch 1.
    assert loader.epoch == 1 and loader.state_dict() == {"epoch": 1, "position": 0}
    epoch1 = _ids(loader.next_batch()) + _ids(loader.next_batch())
    assert loader.epoch == 2
    assert len(set(epoch0)) == 8 and len(set(epoch1)) == 8
    assert epoch0 != epoch1
    assert epoch1 == torch.randperm(10, generator=torch.Generator().manual_seed(1))[:8].tolist()


def test_loader_same_seed_same_order_and_unshuffled():
    a = SequenceLoader(_rows(9), batch_size=3, seed=1)
    b = SequenceLoader(_rows(9), batch_size=3, seed=1)
    assert [_ids(a.next_batch()) for _ in range(7)] == [_ids(b.next_batch()) for _ in range(7)]
    plain = SequenceLoader(_rows(7), batch_size=3, seed=1, shuffle=False)
    assert [_ids(plain.next_batch()) for _ in range(4)] == [[0, 1, 2], [3, 4, 5], [0, 1, 2],
                                                            [3, 4, 5]]


@pytest.mark.parametrize("k", [0, 2, 3, 4, 5])
def test_loader_resume_is_exact_across_epoch_boundary(k):
    # 11 rows, batch 3: 3 batches per epoch; k = 3 sits exactly on the boundary.
    reference = SequenceLoader(_rows(11), batch_size=3, seed=42)
    expected = [_ids(reference.next_batch()) for _ in range(k + 6)]

    first = SequenceLoader(_rows(11), batch_size=3, seed=42)
    for _ in range(k):
        first.next_batch()
    state = json.loads(json.dumps(first.state_dict()))  # plain ints survive JSON
    assert set(state) == {"epoch", "position"} and all(type(v) is int for v in state.values())

    resumed = SequenceLoader(_rows(11), batch_size=3, seed=42)
    resumed.load_state_dict(state)
    assert [_ids(resumed.next_batch()) for _ in range(6)] == expected[k:]
    assert resumed.epoch == reference.epoch


def test_loader_iter_batches_once_is_ordered_and_stateless():
    loader = SequenceLoader(_rows(8), batch_size=3, seed=0)
    loader.next_batch()
    state = loader.state_dict()
    assert [_ids(b) for b in loader.iter_batches_once()] == [[0, 1, 2], [3, 4, 5]]
    assert loader.state_dict() == state


def test_loader_errors():
    with pytest.raises(DataError):
        SequenceLoader(_rows(2), batch_size=3, seed=0)
    loader = SequenceLoader(_rows(4), batch_size=2, seed=0)
    with pytest.raises(DataError):
        loader.load_state_dict({"epoch": 0, "position": 99})
    with pytest.raises(DataError):
        loader.load_state_dict({"step": 3})


# ------------------------------------------------------------------------------- tokenize + BPE

def test_tokenize_documents_drops_bos():
    tok = Tokenizer(lambda s: [1] + [ord(c) for c in s], lambda ids: "".join(map(chr, ids)),
                    vocab_size=300, bos_id=1, eos_id=2, add_bos=True, source="test",
                    max_token_bytes=4)
    assert tokenize_documents(tok, ["hi", "", "a"]) == [[104, 105], [], [97]]


CORPUS = ["def add(x, y):\n    return x + y\n", "hello world, hello again, hello there",
          "the quick brown fox jumps over the lazy dog"] * 10 + ["ünïcödé 日本語 🤗"]


def test_bpe_specials_and_round_trip(tmp_path):
    from tokenizers import Tokenizer as HFTokenizer

    tok = train_bpe_tokenizer(CORPUS, 300, tmp_path / "tok")
    hf = HFTokenizer.from_file(str(tmp_path / "tok" / "tokenizer.json"))
    assert [hf.token_to_id(t) for t in ("<pad>", "<s>", "</s>")] == [0, 1, 2]
    assert (tok.bos_id, tok.eos_id) == (1, 2)
    assert 259 < tok.vocab_size <= 300  # merges were learned, budget respected
    config = json.loads((tmp_path / "tok" / "tokenizer_config.json").read_text())
    assert (config["bos_token"], config["eos_token"], config["pad_token"]) == ("<s>", "</s>",
                                                                               "<pad>")
    assert len(tok.encode("hello", add_bos=False)) < 5  # a frequent word got merged
    assert tok.encode("hello")[0] == 1 and tok.encode("hello", add_bos=False)[0] != 1
    for text in ["  indented\n\tcode()\r\n", "emoji 🤗🎉 and ZWJ 👩‍💻", "日本語 ünseen wörds",
                 "\x00\x7f control", " leading space", "trailing  \n\n", "é e\u0301"]:
        ids = tok.encode(text, add_bos=False)
        assert all(0 <= i < tok.vocab_size for i in ids)
        assert tok.decode(ids) == text


def test_bpe_is_deterministic(tmp_path):
    train_bpe_tokenizer(iter(CORPUS), 290, tmp_path / "a")
    train_bpe_tokenizer(list(CORPUS), 290, tmp_path / "b")
    assert (tmp_path / "a" / "tokenizer.json").read_bytes() == \
        (tmp_path / "b" / "tokenizer.json").read_bytes()


def test_bpe_rejects_tiny_vocab_and_empty_corpus(tmp_path):
    with pytest.raises(DataError, match="vocab_size"):
        train_bpe_tokenizer(CORPUS, 259, tmp_path / "t")
    with pytest.raises(DataError, match="empty"):
        train_bpe_tokenizer(["", ""], 300, tmp_path / "e")


def test_end_to_end_pipeline(tmp_path):
    _write(tmp_path / "a.txt", "abc")
    _write(tmp_path / "b.jsonl", '{"text": "de"}\n')
    docs = read_documents([tmp_path])
    tok = Tokenizer(lambda s: [ord(c) for c in s], lambda ids: "", 300, None, 2, False, "test", 4)
    packed = pack_documents(tokenize_documents(tok, docs), seq_len=3, eos_id=2)
    # stream: a b c </s> d e </s> -> 2 rows, tail dropped
    assert packed.tolist() == [[97, 98, 99], [2, 100, 101]]
    assert SequenceLoader(packed, batch_size=2, seed=0).next_batch().shape == (2, 3)
