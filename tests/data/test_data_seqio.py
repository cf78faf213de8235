"""seqio side: the registered Tasks/Mixture, seqio's DecoderFeatureConverter(pack=True) against the numpy
packer used for the cache (identical rows), no token lost in seqio's packing, the text_files task, the C4
task definition (not run), and materialising a task through seqio."""

import numpy as np
import pytest

from moe_jax.data.corpus import iter_docs
from moe_jax.data.loader import FEATURES, TokenLoader
from moe_jax.data.packing import model_features
from moe_jax.data.store import read_array

tasks = pytest.importorskip("moe_jax.data.tasks", reason="seqio/tensorflow not installed")
SEQ_LEN = 64


@pytest.fixture(scope="module")
def registered(tiny_data):
    return tasks.register_corpus_tasks(tiny_data["corpus"], tiny_data["vocab"], prefix="tiny")


def _seqio_rows(name, split):
    return list(tasks.packed_dataset(name, SEQ_LEN, split).as_numpy_iterator())


@pytest.mark.slow
@pytest.mark.parametrize("split", ["train", "heldout"])
def test_numpy_packer_matches_seqio_decoder_feature_converter(tiny_data, registered, split):
    tokens = read_array(tiny_data["cache"] / split / "tokens")
    segs = read_array(tiny_data["cache"] / split / "segment_ids")
    for source, info in tiny_data["meta"]["splits"][split]["sources"].items():
        ref = _seqio_rows(f"tiny.{source}", split)
        a, b = info["row_start"], info["row_end"]
        mine = model_features(tokens[a:b], segs[a:b])
        assert len(ref) == b - a > 0
        for k in FEATURES:
            np.testing.assert_array_equal(np.stack([r[k] for r in ref]), mine[k], err_msg=f"{source}/{split}/{k}")


def test_seqio_packing_loses_no_token(tiny_data, registered):
    from moe_jax.data import vocab

    sp = vocab.load(tiny_data["vocab"])
    docs = list(iter_docs(tiny_data["corpus"], "alpha", "train"))
    expected = sum(len(ids) + 1 for ids in sp.encode(docs))  # every token + one EOS per document
    rows = _seqio_rows("tiny.alpha", "train")
    assert sum(int(r["decoder_loss_weights"].sum()) for r in rows) == expected
    assert sum(int((r["decoder_target_tokens"] == sp.eos_id()).sum()) for r in rows) == len(docs)
    assert expected == tiny_data["meta"]["splits"]["train"]["sources"]["alpha"]["tokens"]
    assert any(len(ids) + 1 > SEQ_LEN for ids in sp.encode(docs))  # long documents were really cut


def test_mixture_with_rates(tiny_data, registered):
    import seqio

    mix = seqio.get_mixture_or_task(registered)
    rates = {t.name: mix.get_rate(t) for t in mix.tasks}
    src = tiny_data["manifest"]["sources"]
    assert rates == {f"tiny.{n}": float(s["splits"]["train"]["bytes"]) for n, s in src.items()}
    tasks.register_corpus_tasks(tiny_data["corpus"], tiny_data["vocab"], prefix="tiny_r", rates={"beta": 1.0})
    assert [t.name for t in seqio.get_mixture_or_task("tiny_r").tasks] == ["tiny_r.beta"]
    rows = list(tasks.packed_dataset(registered, SEQ_LEN, "train", shuffle=True, seed=1).take(4).as_numpy_iterator())
    assert len(rows) == 4 and all(r["decoder_target_tokens"].shape == (SEQ_LEN,) for r in rows)


def test_text_files_task_equals_the_built_corpus(tiny_data, fixture_texts):
    tasks.register_text_files_task(
        "tiny_files", [f"{fixture_texts['alpha']}/*.txt"], tiny_data["vocab"], heldout_frac=0.1, heldout_min_bytes=0
    )
    # same documents, same split, same packed rows as source "alpha" of the built corpus (built first)
    tokens = read_array(tiny_data["cache"] / "train" / "tokens")
    info = tiny_data["meta"]["splits"]["train"]["sources"]["alpha"]
    rows = _seqio_rows("tiny_files", "train")
    np.testing.assert_array_equal(
        np.stack([r["decoder_target_tokens"] for r in rows]), tokens[info["row_start"] : info["row_end"]]
    )


def test_text_files_task_errors(tiny_data, tmp_path):
    from moe_jax.data.errors import CorpusMissingError, EncodingError

    tasks.register_text_files_task("tiny_missing", [str(tmp_path / "none*.txt")], tiny_data["vocab"])
    with pytest.raises(Exception) as e:
        _seqio_rows("tiny_missing", "train")
    assert "no files match" in str(e.value) or isinstance(e.value, CorpusMissingError)
    (tmp_path / "bad.txt").write_bytes(b"\xff\xfe bad")
    with pytest.raises(EncodingError):
        tasks.text_files_docs([str(tmp_path / "bad.txt")])


def test_c4_task_is_defined_not_run(tiny_data):
    import seqio

    task = tasks.register_c4_task(tiny_data["vocab"], name="tiny_c4")
    assert isinstance(task.source, seqio.TfdsDataSource)
    assert task.source.tfds_dataset.name == "c4/en:3.0.1"
    assert set(task.output_features) == {"targets"}


def test_materialise_through_seqio_feeds_the_loader(tiny_data, registered, tmp_path):
    out = tmp_path / "seqio_cache"
    meta = tasks.materialise("tiny.beta", out, SEQ_LEN, tiny_data["vocab"], progress=False)
    ref = tiny_data["meta"]["splits"]["train"]["sources"]["beta"]
    assert meta["splits"]["train"]["tokens"] == ref["tokens"]
    assert meta["splits"]["train"]["utf8_bytes"] == ref["utf8_bytes"]
    loader = TokenLoader(out, split="train", batch_size=2, shuffle=False)
    tokens = read_array(tiny_data["cache"] / "train" / "tokens")[ref["row_start"] : ref["row_end"]]
    np.testing.assert_array_equal(next(loader)["decoder_target_tokens"], tokens[:2])
