"""Data: reading each format, errors naming the line, packing and label masks, splits, resumable batches."""

import json

import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("tokenizers")

from lowres.config import DataConfig  # noqa: E402
from lowres.data import (  # noqa: E402
    IGNORE,
    BatchIterator,
    build_data,
    list_samples,
    read_records,
    render_texts,
    split_blocks,
    tokenize,
)
from lowres.errors import DataError  # noqa: E402
from lowres.models import train_tokenizer  # noqa: E402
from lowres.models.tokenizer import render_chat  # noqa: E402

ROWS = [{"instruction": f"What is {i} plus {i}?", "response": f"{i} plus {i} is {2 * i}."} for i in range(40)]


@pytest.fixture(scope="module")
def tok():
    texts = [render_chat(r["instruction"], r["response"]) for r in ROWS] + [f"log line {i} ok" for i in range(50)]
    return train_tokenizer(texts, 400)


def _cfg(**kw):
    return DataConfig(**kw)


def test_each_format_is_read(tmp_path):
    (tmp_path / "a.jsonl").write_text("\n".join(json.dumps(r) for r in ROWS[:3]) + "\n\n")
    (tmp_path / "b.json").write_text(json.dumps(ROWS[:2]))
    (tmp_path / "c.csv").write_text('instruction,response\n"Hi, you",Hello\nQ,A\n')
    (tmp_path / "d.txt").write_text("first line\n\nsecond line\n")
    assert len(read_records(_cfg(path=str(tmp_path / "a.jsonl")))) == 3
    assert read_records(_cfg(path=str(tmp_path / "b.json")))[1] == ROWS[1]
    assert read_records(_cfg(path=str(tmp_path / "c.csv")))[0] == {"instruction": "Hi, you", "response": "Hello"}
    assert read_records(_cfg(path=str(tmp_path / "d.txt"))) == [{"text": "first line"}, {"text": "second line"}]
    assert len(read_records(_cfg(path=str(tmp_path)))) == 3 + 2 + 2 + 2  # a folder reads every file
    assert len(read_records(_cfg(path=str(tmp_path / "a.jsonl"), max_examples=2))) == 2


def test_shipped_samples_and_default():
    assert {"hdfs_logs", "instructions"} <= set(list_samples())
    assert DataConfig().sample == "instructions"  # the default: what the default (instruct) model learns from
    logs = read_records(_cfg(sample="hdfs_logs"))
    assert len(logs) == 1000 and "text" in logs[0]
    pairs = render_texts(read_records(_cfg()), _cfg())
    assert len(pairs) == 180 and all(isinstance(p, tuple) for p in pairs)
    with pytest.raises(DataError, match="hdfs_logs"):
        read_records(_cfg(sample="tiny_shakespeare"))


def test_malformed_jsonl_names_file_and_line(tmp_path):
    f = tmp_path / "bad.jsonl"
    f.write_text('{"text": "ok"}\n{"text": "ok"}\n{"text": "broken\n')
    with pytest.raises(DataError, match=r"bad\.jsonl:3: not valid JSON") as exc:
        read_records(_cfg(path=str(f)))
    assert exc.value.exit_code == 2
    f.write_text('{"text": "ok"}\n["a list"]\n')
    with pytest.raises(DataError, match=r"bad\.jsonl:2: a JSON list"):
        read_records(_cfg(path=str(f)))


def test_csv_with_wrong_column_count_names_the_line(tmp_path):
    f = tmp_path / "bad.csv"
    f.write_text("text\nfine\ntoo,many\n")
    with pytest.raises(DataError, match=r"bad\.csv:3"):
        read_records(_cfg(path=str(f)))


def test_missing_empty_and_unreachable_data(tmp_path):
    with pytest.raises(DataError, match="does not exist"):
        read_records(_cfg(path=str(tmp_path / "nope.jsonl")))
    (tmp_path / "empty.jsonl").write_text("\n\n")
    with pytest.raises(DataError, match="no examples"):
        read_records(_cfg(path=str(tmp_path / "empty.jsonl")))
    with pytest.raises(DataError, match="no data given"):
        read_records(_cfg(sample=None))


def test_hub_dataset_offline_is_a_data_error(monkeypatch):
    pytest.importorskip("datasets")
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    with pytest.raises(DataError, match="lowres-test/no-such-dataset"):
        read_records(_cfg(path="hf:lowres-test/no-such-dataset"))


def test_fields_that_do_not_match_are_named():
    with pytest.raises(DataError, match="body"):
        render_texts([{"body": "x"}], _cfg())
    assert render_texts([{"body": "x"}], _cfg(text_field="body")) == ["x"]


def test_packing_shapes_and_labels(tok):
    texts = [f"log line {i} ok" for i in range(50)]
    blocks = tokenize(texts, tok, _cfg(max_length=16))
    n_ids = sum(len(tok(t)["input_ids"]) + 1 for t in texts)  # + EOS after each
    assert blocks.input_ids.shape[1] == 16 and blocks.attention_mask is None
    tail = n_ids % 16
    assert len(blocks) == n_ids // 16 + (1 if tail >= 4 else 0)  # a tail is kept from a quarter block up
    assert int((blocks.labels != IGNORE).sum()) == n_ids - (tail if tail < 4 else 0)
    real = blocks.labels != IGNORE
    assert torch.equal(blocks.labels[real], blocks.input_ids[real])
    assert int((blocks.input_ids == tok.eos_token_id).sum()) >= 49


def test_instruct_prompt_is_masked(tok):
    pairs = render_texts(ROWS[:4], _cfg(), tok)
    blocks = tokenize(pairs, tok, _cfg(max_length=64, packing=False))
    assert blocks.input_ids.shape == (4, 64) and blocks.attention_mask is not None
    row = blocks.labels[0]
    learned = tok.decode(row[row != IGNORE].tolist())
    assert learned == "0 plus 0 is 0.<|endoftext|>"  # the response and its EOS, no prompt
    assert int(blocks.attention_mask[0].sum()) == int((blocks.input_ids[0] != tok.pad_token_id).sum())
    assert (blocks.labels[blocks.attention_mask == 0] == IGNORE).all()


def test_prompt_longer_than_block_is_dropped(tok):
    pairs = [("word " * 100, "x"), ("short", "y")]
    assert len(tokenize(pairs, tok, _cfg(max_length=16, packing=False))) == 1


def test_split_is_deterministic_and_disjoint(tok):
    blocks = tokenize([f"log line {i} ok" for i in range(400)], tok, _cfg(max_length=8))
    a_train, a_eval = split_blocks(blocks, 0.1, seed=1)
    b_train, b_eval = split_blocks(blocks, 0.1, seed=1)
    _, c_eval = split_blocks(blocks, 0.1, seed=2)
    assert torch.equal(a_eval.input_ids, b_eval.input_ids) and torch.equal(a_train.input_ids, b_train.input_ids)
    assert len(a_train) + len(a_eval) == len(blocks) and len(a_eval) == round(0.1 * len(blocks))
    assert not torch.equal(a_eval.input_ids, c_eval.input_ids)
    rows = {tuple(r) for r in a_train.input_ids.tolist()} | {tuple(r) for r in a_eval.input_ids.tolist()}
    assert rows == {tuple(r) for r in blocks.input_ids.tolist()}


def test_batch_iterator_resumes_exactly(tok):
    blocks = tokenize([f"log line {i} ok" for i in range(100)], tok, _cfg(max_length=8))
    it = BatchIterator(blocks, batch_size=3, seed=5)
    for _ in range(int(len(blocks) / 3) + 2):  # past an epoch boundary
        it.next()
    state = it.state_dict()
    assert state["epoch"] == 1 and set(state) == {"epoch", "index", "seed"}
    expected = [it.next()["input_ids"] for _ in range(4)]
    resumed = BatchIterator(blocks, batch_size=3, seed=0)
    resumed.load_state_dict(state)
    for want in expected:
        assert torch.equal(resumed.next()["input_ids"], want)
    other = BatchIterator(blocks, batch_size=3, seed=6)
    first = BatchIterator(blocks, batch_size=3, seed=5).next()["input_ids"]
    assert not torch.equal(other.next()["input_ids"], first)


def test_build_data_stats(tok):
    cfg = _cfg(sample="instructions", max_length=64, eval_fraction=0.1)
    bundle = build_data(cfg, tok, seed=0)
    s = bundle.stats
    assert s["n_records"] == 180 and s["format"] == "instruct"
    assert s["n_train_blocks"] + s["n_eval_blocks"] == s["n_blocks"] == len(bundle.train) + len(bundle.eval)
    assert 0 < s["n_label_tokens"] < s["n_tokens"] <= s["n_blocks"] * 64
