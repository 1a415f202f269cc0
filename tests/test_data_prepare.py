"""``skymoe data prepare`` and training from prepared data: the shards hold exactly what the
in-memory path tokenizes, large files are read in pieces that tokenize as the whole, bad input
is named by file and line (or skipped and counted), an interrupted prepare leaves nothing, the
vocabulary picks the token width, the validation split is stable, mixtures follow their weights
and resume under another data-parallel split, and training refuses another tokenizer's data."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from skymoe.cli import main
from skymoe.errors import ConfigError, DataError
from skymoe.train import prepare as prepare_module
from skymoe.train.bpe import train_bpe_tokenizer
from skymoe.train.data import (SequenceLoader, pack_documents, read_documents,
                               tokenize_documents)
from skymoe.train.mixture import MixtureLoader
from skymoe.train.prepare import PreparedData, prepare_dataset
from skymoe.train.sources import iter_chunks
from skymoe.train.token_rows import TokenRows
from skymoe.train.trainer import Trainer

from test_train import WORDS, _config, _corpus, _losses


def _mixed_corpus(root: Path) -> Path:
    """Text files, a JSONL file and a Parquet file of pseudo-random words and some code."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    gen = torch.Generator().manual_seed(1)

    def words(n: int) -> str:
        return " ".join(WORDS[i] for i in torch.randint(len(WORDS), (n,), generator=gen))

    root.mkdir(parents=True)
    for d in range(6):
        (root / f"doc{d}.txt").write_text(f"def f{d}(x):\n    return x + {d}\n" + words(50))
    (root / "more.jsonl").write_text("".join(json.dumps({"text": words(30), "id": i}) + "\n"
                                             for i in range(8)))
    pq.write_table(pa.table({"text": [words(20) for _ in range(5)]}), root / "table.parquet")
    return root


@pytest.fixture(scope="module")
def tokenizer_dir(tmp_path_factory) -> Path:
    directory = tmp_path_factory.mktemp("tok") / "tokenizer"
    docs = [" ".join(WORDS) * 3, "def f(x):\n    return x + 1\n"] * 5
    train_bpe_tokenizer(docs, 300, directory)
    return directory


def test_prepared_tokens_equal_the_in_memory_pipeline(tmp_path, tokenizer_dir):
    corpus = _mixed_corpus(tmp_path / "corpus")
    report = prepare_dataset([corpus], tokenizer_dir, tmp_path / "out", batch_bytes=100,
                             show_progress=False)
    tok = prepare_module.load_tokenizer(tokenizer_dir)
    docs = read_documents([corpus])
    assert report.documents == {"train": len(docs), "val": 0} == {"train": 19, "val": 0}
    want = pack_documents(tokenize_documents(tok, docs), 16, tok.eos_id)
    rows = PreparedData(tmp_path / "out").rows("train", 16)
    assert len(rows) == want.shape[0]
    assert torch.equal(rows.read(range(len(rows))), want)
    meta = json.loads((tmp_path / "out" / "meta.json").read_text())
    assert meta["dtype"] == "uint16" and meta["eos_id"] == tok.eos_id
    assert meta["splits"]["train"]["tokens"] == sum(len(t) + 1 for t in
                                                    tokenize_documents(tok, docs))
    # Document boundaries: the end offset of each document, EOS included.
    ends = np.fromfile(tmp_path / "out" / "train-00000.idx", dtype="<i8")
    assert ends.tolist() == np.cumsum([len(t) + 1 for t in tokenize_documents(tok, docs)]
                                      ).tolist()
    assert (tmp_path / "out" / "tokenizer" / "tokenizer.json").read_bytes() == \
        (tokenizer_dir / "tokenizer.json").read_bytes()


def test_shards_end_at_document_boundaries(tmp_path, tokenizer_dir):
    corpus = _mixed_corpus(tmp_path / "corpus")
    prepare_dataset([corpus], tokenizer_dir, tmp_path / "one", show_progress=False)
    prepare_dataset([corpus], tokenizer_dir, tmp_path / "many", shard_tokens=100,
                    show_progress=False)
    shards = json.loads((tmp_path / "many" / "meta.json").read_text())["splits"]["train"]
    assert len(shards["shards"]) > 3
    for shard in shards["shards"]:
        tokens = np.fromfile(tmp_path / "many" / shard["file"], dtype="<u2")
        assert tokens[-1] == 2 and len(tokens) == shard["tokens"]  # ends with EOS
    one, many = PreparedData(tmp_path / "one"), PreparedData(tmp_path / "many")
    a, b = one.rows("train", 7), many.rows("train", 7)  # rows spanning shards
    assert torch.equal(a.read(range(len(a))), b.read(range(len(b))))


def test_a_large_text_file_is_read_in_pieces_that_tokenize_as_the_whole(tmp_path,
                                                                         tokenizer_dir):
    lines = []
    for i in range(300):
        lines += [f"def f{i}(x):", f"    return x * {i}  # {WORDS[i % len(WORDS)]}", ""]
    text = "\n".join(lines) + "\nünïcödé 日本語 🤗 " * 40
    path = tmp_path / "big.txt"
    path.write_text(text)
    chunks = list(iter_chunks([path], chunk_bytes=256))
    assert len(chunks) > 20 and [c.ends_document for c in chunks] == [False] * (
        len(chunks) - 1) + [True]
    assert "".join(c.text for c in chunks) == text
    assert sum(c.nbytes for c in chunks) == len(text.encode())
    tok = prepare_module.load_tokenizer(tokenizer_dir)
    pieces = [i for c in chunks for i in tok.encode(c.text, add_bos=False)]
    assert pieces == tok.encode(text, add_bos=False)


def test_bad_input_is_named_by_file_and_line_or_skipped_and_counted(tmp_path, tokenizer_dir,
                                                                     capsys):
    corpus = tmp_path / "corpus"
    corpus.mkdir()
    (corpus / "a.jsonl").write_text('{"text": "fine"}\n{"text": "broken",\n'
                                    '{"body": "no text"}\n{"text": "also fine"}\n')
    (corpus / "b.txt").write_bytes(b"good line\nbad \xff byte\n")
    (corpus / "c.txt").write_text("kept")
    with pytest.raises(DataError, match=r"a\.jsonl:2: not valid JSON"):
        prepare_dataset([corpus], tokenizer_dir, tmp_path / "out", show_progress=False)
    assert list(tmp_path.iterdir()) == [corpus]  # nothing left behind
    args = ["data", "prepare", str(corpus), "--tokenizer", str(tokenizer_dir), "--out",
            str(tmp_path / "out"), "--val-fraction", "0"]
    assert main(args) == 2
    assert "a.jsonl:2: not valid JSON" in capsys.readouterr().err
    assert main(args + ["--skip-bad"]) == 0
    out = capsys.readouterr().out
    assert "skipped 3 bad input(s)" in out
    assert "a.jsonl:3: no string field 'text'" in out and "b.txt:2: not UTF-8" in out
    meta = json.loads((tmp_path / "out" / "meta.json").read_text())
    assert meta["skipped"]["count"] == 3 and meta["splits"]["train"]["documents"] == 3
    assert main(args) == 2  # the output now exists: refused
    assert "already exists" in capsys.readouterr().err


def test_an_interrupted_prepare_leaves_nothing(tmp_path, tokenizer_dir, monkeypatch):
    corpus = _mixed_corpus(tmp_path / "corpus")
    calls = []
    real = prepare_module.Tokenizer.encode_batch

    def interrupted(self, texts, add_bos=None):
        calls.append(len(texts))
        if len(calls) == 3:
            raise KeyboardInterrupt
        return real(self, texts, add_bos)

    monkeypatch.setattr(prepare_module.Tokenizer, "encode_batch", interrupted)
    with pytest.raises(KeyboardInterrupt):
        prepare_dataset([corpus], tokenizer_dir, tmp_path / "out", batch_bytes=100,
                        show_progress=False)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["corpus"]
    with pytest.raises(DataError, match="not prepared data"):
        PreparedData(tmp_path / "out")


def test_a_vocabulary_past_65536_is_stored_as_uint32(tmp_path):
    from tokenizers import Tokenizer as HFTokenizer, models, pre_tokenizers

    vocab = {f"w{i}": i for i in range(70_000)}
    vocab["</s>"] = 70_000
    hf = HFTokenizer(models.WordLevel(vocab, unk_token="w0"))
    hf.pre_tokenizer = pre_tokenizers.Whitespace()
    (tmp_path / "tok").mkdir()
    hf.save(str(tmp_path / "tok" / "tokenizer.json"))
    (tmp_path / "tok" / "tokenizer_config.json").write_text('{"eos_token": "</s>"}')
    (tmp_path / "corpus.txt").write_text("w1 w69999 w65536 w3")
    prepare_dataset([tmp_path / "corpus.txt"], tmp_path / "tok", tmp_path / "out",
                    show_progress=False)
    data = PreparedData(tmp_path / "out")
    assert data.meta["dtype"] == "uint32"
    assert data.rows("train", 5).read([0]).tolist() == [[1, 69999, 65536, 3, 70000]]


def test_the_validation_split_is_by_document_and_stable(tmp_path, tokenizer_dir):
    corpus = tmp_path / "corpus.jsonl"
    texts = [f"document {i} " + " ".join(WORDS[: 1 + i % 20]) for i in range(400)]
    corpus.write_text("".join(json.dumps({"text": t}) + "\n" for t in texts))
    for name, seed in (("a", 0), ("b", 0), ("c", 1)):
        prepare_dataset([corpus], tokenizer_dir, tmp_path / name, val_fraction=0.1, seed=seed,
                        show_progress=False)
    tok = prepare_module.load_tokenizer(tokenizer_dir)

    def held_out(name: str) -> list[str]:
        data = PreparedData(tmp_path / name)
        tokens = data.rows("val", 1).read(range(data.tokens("val"))).reshape(-1).tolist()
        docs, current = [], []
        for t in tokens:
            if t == tok.eos_id:
                docs.append(tok.decode(current))
                current = []
            else:
                current.append(t)
        return docs

    a, b, c = held_out("a"), held_out("b"), held_out("c")
    assert a == b and a != c  # the same seed gives the same split, another seed another
    assert 20 <= len(a) <= 60 and set(a) <= set(texts)  # whole documents, about 10 %
    meta = PreparedData(tmp_path / "a").meta["splits"]
    assert meta["train"]["documents"] + meta["val"]["documents"] == 400


def _rows(n: int, offset: int) -> TokenRows:
    return TokenRows([np.arange(offset, offset + 2 * n, dtype=np.int64)], 2)


def test_a_mixture_follows_its_weights_and_resumes_under_another_split():
    datasets = [_rows(50, 0), _rows(30, 1000)]
    whole = MixtureLoader(datasets, [3.0, 1.0], batch_size=8, seed=5)
    batches = [whole.next_batch() for _ in range(40)]
    firsts = torch.cat(batches)[:, 0]
    share = (firsts < 1000).float().mean().item()
    assert 0.68 < share < 0.82  # 3:1 over 320 samples
    # Within each dataset, one epoch visits every row once before any repeats.
    from_second = [int(v) for v in firsts if v >= 1000][:30]
    assert sorted(from_second) == list(range(1000, 1060, 2))
    # Two data-parallel ranks reading their halves, resumed after 10 batches by four ranks
    # reading their quarters: the same batches as one reader.
    halves = MixtureLoader(datasets, [3.0, 1.0], batch_size=8, seed=5)
    got = [_split_batch(halves, [(0, 4), (4, 8)]) for _ in range(10)]
    quarters = MixtureLoader(datasets, [3.0, 1.0], batch_size=8, seed=5)
    quarters.load_state_dict(json.loads(json.dumps(halves.state_dict())))
    got += [_split_batch(quarters, [(0, 2), (2, 4), (4, 6), (6, 8)]) for _ in range(30)]
    for i, (a, b) in enumerate(zip(got, batches)):
        assert torch.equal(a, b), i


def _split_batch(loader: MixtureLoader, ranks: list[tuple[int, int]]) -> torch.Tensor:
    """The next batch as data-parallel ranks read it, each its rows (``loader`` is the first
    rank's; the others' are copies in the same state), put back together."""
    others = [_replay(loader, rows) for rows in ranks[1:]]
    return torch.cat([loader.next_batch(ranks[0]), *others])


def _replay(loader: MixtureLoader, local: tuple[int, int]) -> torch.Tensor:
    """What another rank reads of the batch ``loader`` is about to draw (its own loader is in
    the same state): a copy of the loader draws it."""
    twin = MixtureLoader([lo.rows for lo in loader.loaders], loader.weights,
                         loader.batch_size, loader.seed)
    twin.load_state_dict(json.loads(json.dumps(loader.state_dict())))
    return twin.next_batch(local)


def test_a_single_dataset_loader_reads_only_the_local_rows():
    loader = SequenceLoader(_rows(20, 0), batch_size=4, seed=0)
    twin = SequenceLoader(_rows(20, 0), batch_size=4, seed=0)
    for _ in range(12):
        whole = twin.next_batch()
        assert torch.equal(loader.next_batch((1, 3)), whole[1:3])


# ------------------------------------------------------------------------------ training
def test_training_from_prepared_data_equals_the_in_memory_run(tmp_path, tokenizer_dir):
    corpus = _corpus(tmp_path / "corpus")
    prepare_dataset([corpus], tokenizer_dir, tmp_path / "prepared", show_progress=False)
    settings = dict(train={"precision": "fp32", "steps": 3, "eval_every": 3},
                    data={"val_fraction": 0.0})
    memory = _config(tmp_path, "memory", tokenizer={"path": str(tokenizer_dir)}, **settings)
    prepared = _config(tmp_path, "prepared-run", **settings)
    prepared.data.sources, prepared.data.prepared = [], [str(tmp_path / "prepared")]
    for cfg in (memory, prepared):
        trainer = Trainer(cfg, quiet=True)
        trainer.run()
        trainer.close()
    assert _losses(tmp_path / "prepared-run") == _losses(tmp_path / "memory")
    # The run's tokenizer is the data's own, saved with its checkpoints.
    ckpt = tmp_path / "prepared-run" / "checkpoints" / "step-00000003"
    assert (ckpt / "tokenizer.json").read_bytes() == (tokenizer_dir / "tokenizer.json"
                                                      ).read_bytes()


def test_training_refuses_data_prepared_with_another_tokenizer(tmp_path, tokenizer_dir):
    corpus = _corpus(tmp_path / "corpus")
    prepare_dataset([corpus], tokenizer_dir, tmp_path / "prepared", show_progress=False)
    other = tmp_path / "other-tok"
    train_bpe_tokenizer(["something else entirely"] * 20, 280, other)
    cfg = _config(tmp_path, "run", tokenizer={"path": str(other)})
    cfg.data.sources, cfg.data.prepared = [], [str(tmp_path / "prepared")]
    with pytest.raises(ConfigError, match=r"prepared.*another tokenizer.*other-tok"):
        Trainer(cfg, quiet=True)
