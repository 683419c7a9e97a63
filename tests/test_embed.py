"""Encode & Map on a small synthetic run: the packaged MiniLM encoder, PCA to the SASRec width."""

import json

import joblib
import numpy as np
import pandas as pd
import pytest

from cotrec.embed import embed, load_embedding
from cotrec.embed.encoder import encode, load_encoder
from cotrec.errors import CotrecError
from retriever_data import fake_extraction, synthetic_run


@pytest.fixture(scope="module")
def encoder():
    return load_encoder("all-MiniLM-L6-v2")


def test_encoder_puts_related_texts_closer(encoder):
    vectors = encode(encoder, ["a space adventure with starships", "science fiction voyage among the stars",
                               "a romantic comedy in Paris"], batch_size=2)
    assert vectors.shape == (3, 384)
    unit = vectors / np.linalg.norm(vectors, axis=1, keepdims=True)
    assert unit[0] @ unit[1] > unit[0] @ unit[2]


def test_caption_embedding_is_reduced_normalised_saved_and_skipped(tmp_path):
    config, run = synthetic_run(tmp_path / "run", config_overrides=("retriever.dim=16",))
    summary = embed(config, run)
    assert list(summary["kinds"]) == ["caption"]            # no extraction output yet
    assert summary["not_available"] == ["description", "preference"]
    folder = tmp_path / "run" / "embed" / "caption"
    matrix = np.load(folder / "matrix.npy")
    assert matrix.shape == (80, 16) and matrix.dtype == np.float32
    assert np.allclose(np.linalg.norm(matrix, axis=1), 1.0, atol=1e-5)
    # the fitted reduction maps new encoder outputs into the same space
    mapper = joblib.load(folder / "reduction.joblib")
    fresh = encode(load_encoder("all-MiniLM-L6-v2"), [pd.read_parquet(tmp_path / "run" / "data" / "items.parquet").caption[50], "a horror film"])
    mapped = mapper.transform(fresh.astype(np.float64))
    assert mapped.shape == (2, 16) and np.allclose(np.linalg.norm(mapped, axis=1), 1.0)
    assert np.allclose(mapped[0], matrix[50], atol=1e-4)          # same text, same row
    nearest = np.argsort(-(matrix @ mapped[1]))[:5]
    assert all(20 <= i < 30 for i in nearest)                     # items 20-29 are the horror ones
    meta = json.loads((folder / "meta.json").read_text())
    assert meta["reduction"] == "pca" and meta["encoder_dim"] == 384
    assert embed(config, run)["kinds"]["caption"]["skipped"]


def test_description_and_preference_need_the_extraction_outputs(tmp_path):
    config, run = synthetic_run(tmp_path / "run", config_overrides=("retriever.dim=16",))
    with pytest.raises(CotrecError, match="extract/item_descriptions"):
        embed(config, run, kinds=["description"])
    with pytest.raises(CotrecError, match="extract/preferences"):
        load_embedding(config, run, "preference")


def test_description_and_preference_embeddings_from_synthetic_extraction(tmp_path):
    config, run = synthetic_run(tmp_path / "run", config_overrides=("retriever.dim=16",))
    fake_extraction(run, status_failed_items={3}, missing_users={5})
    summary = embed(config, run)
    assert set(summary["kinds"]) == {"caption", "description", "preference"}
    desc = summary["kinds"]["description"]
    assert desc["rows"] == 80 and desc["covered"] == 79      # the failed row falls back to its caption
    pref = load_embedding(config, run, "preference")
    assert pref["matrix"].shape == (3, 60, 16)
    assert pref["found"].sum(axis=1).tolist() == [59, 59, 59] and not pref["found"][:, 5].any()
    meta = summary["kinds"]["preference"]  # the map is fitted on what the train horizon knows, nothing later
    assert meta["fit_on"] == "train horizon" and meta["fit_rows"] == 59
    assert np.allclose(np.linalg.norm(pref["matrix"][pref["found"]], axis=1), 1.0, atol=1e-5)
    # descriptions change (a new shard supersedes the failed row) -> only the description embedding is redone
    folder = tmp_path / "run" / "extract" / "item_descriptions"
    table = pd.read_parquet(folder / "part-0.parquet")
    table[table.item_idx == 3].assign(status="ok").to_parquet(folder / "part-1.parquet", index=False)
    again = embed(config, run)
    assert again["kinds"]["caption"]["skipped"] and again["kinds"]["preference"]["skipped"]
    assert not again["kinds"]["description"]["skipped"] and again["kinds"]["description"]["covered"] == 80


def test_past_fit_sample_the_map_is_fitted_on_a_seeded_sample_and_maps_every_text(tmp_path, encoder):
    from sklearn.decomposition import PCA

    from cotrec.embed.stage import fingerprint

    config, run = synthetic_run(tmp_path / "run", config_overrides=("retriever.dim=16", "embed.fit_sample=20"))
    fake_extraction(run)
    summary = embed(config, run)
    caption, preference = summary["kinds"]["caption"], summary["kinds"]["preference"]
    assert (caption["fit_rows"], caption["fit_sampled_from"]) == (20, 80)
    assert (preference["fit_rows"], preference["fit_sampled_from"], preference["fit_on"]) == (20, 60, "train horizon")
    assert preference["encoder_dim"] == 384
    # the same as encoding every caption here, a PCA fitted on the seeded 20 of them, every row
    # projected and L2-normalised (scikit-learn directly, not the stage's own map)
    captions = pd.read_parquet(tmp_path / "run" / "data" / "items.parquet").caption.tolist()
    vectors = encode(encoder, captions, batch_size=64).astype(np.float64)

    def pca_on(rows):
        projected = PCA(16).fit(vectors[rows]).transform(vectors)
        return projected / np.linalg.norm(projected, axis=1, keepdims=True)

    sample = np.sort(np.random.default_rng(config.seed).choice(np.arange(80), 20, replace=False))
    matrix = load_embedding(config, run, "caption")["matrix"]
    assert matrix.shape == (80, 16) and np.allclose(matrix, pca_on(sample), atol=1e-4)
    assert not np.allclose(np.abs(matrix), np.abs(pca_on(np.arange(80))), atol=1e-2)  # fitted on the sample only
    # a sample larger than the catalogue binds nothing: the fingerprint is that of no sample
    wide, unset = config.model_copy(deep=True), config.model_copy(deep=True)
    wide.embed.fit_sample, unset.embed.fit_sample = 1_000, None
    assert fingerprint(wide, run, "caption") == fingerprint(unset, run, "caption") != fingerprint(config, run, "caption")


@pytest.mark.slow
def test_in_a_ray_job_encoders_run_on_actors_and_a_vector_does_not_depend_on_their_number(tmp_path, monkeypatch,
                                                                                          encoder):
    import ray

    import cotrec.embed.stage as stage

    config, run = synthetic_run(tmp_path / "run", config_overrides=("retriever.dim=16", "embed.batch_size=16"))
    texts = pd.read_parquet(tmp_path / "run" / "data" / "items.parquet").caption.tolist()
    in_process = encode(encoder, sorted(set(texts)), batch_size=16)

    def no_encoder_here(*_, **__):
        raise AssertionError("the driver loaded an encoder")

    monkeypatch.setattr(stage, "load_encoder", no_encoder_here)  # this process only; actors load their own
    stage._local_encoder.cache_clear()
    two = config.model_copy(deep=True)
    two.embed.max_actors = 2
    missing = config.model_copy(deep=True)
    missing.embed.model = "/nonexistent/encoder"
    ray.init(address="local", num_cpus=2, include_dashboard=False)
    sampled_one, sampled_two = config.model_copy(deep=True), two.model_copy(deep=True)
    sampled_one.embed.fit_sample = sampled_two.embed.fit_sample = 20
    try:
        on_one = stage.encode_distinct(config, texts, "caption")
        on_two = stage.encode_distinct(two, texts, "caption")
        # past the fit sample the actors map what they encode: the same vectors on one or two
        mapped_one, _, fitted = stage.encode_and_map(sampled_one, texts, np.arange(len(texts)), "caption")
        mapped_two, _, _ = stage.encode_and_map(sampled_two, texts, np.arange(len(texts)), "caption")
        # an actor that cannot load the model fails, and the driver says why in one line (Ray Data's
        # retries of the actor's start would only repeat it)
        ray.data.DataContext.get_current().actor_init_max_retries = 0
        with pytest.raises(CotrecError, match="embed.model: cannot load sentence encoder .*/nonexistent/encoder"):
            stage.encode_distinct(missing, texts, "caption")
    finally:
        ray.shutdown()
    assert on_one.shape == (80, 384) and np.array_equal(on_one, on_two)
    assert fitted == 20 and mapped_one.shape == (80, 16) and np.array_equal(mapped_one, mapped_two)
    rows = {t: i for i, t in enumerate(sorted(set(texts)))}
    assert np.allclose(on_one, in_process[[rows[t] for t in texts]], atol=1e-5)


def test_unknown_encoder_is_one_clear_error(tmp_path):
    config, run = synthetic_run(tmp_path / "run", config_overrides=("embed.model=/nonexistent/encoder",))
    with pytest.raises(CotrecError, match="embed.model: cannot load sentence encoder .*/nonexistent/encoder"):
        embed(config, run)


def test_embed_cli_on_synthetic_run(tmp_path, cli):
    synthetic_run(tmp_path / "run", config_overrides=("retriever.dim=16",))
    result = cli("embed", "--run-dir", str(tmp_path / "run"), "--set", "retriever.dim=16")
    assert result.returncode == 0, result.stderr
    assert "caption" in result.stdout and "80 x 16" in result.stdout and "not available" in result.stdout


def test_a_reduction_fitted_on_fewer_texts_than_the_width_is_padded_not_refused():
    """A small run has fewer users than the SASRec width: PCA finds as many components as there are
    texts, and the rest of the width starts at zero (rows still unit length, new texts mapped alike)."""
    from cotrec.embed.mapping import apply_map, fit_map

    vectors = np.random.default_rng(0).normal(size=(10, 384)).astype(np.float32)
    pipeline = fit_map(vectors, "pca", 16)
    mapped = apply_map(pipeline, np.concatenate([vectors, vectors[:2] + 0.01]))
    assert mapped.shape == (12, 16) and np.allclose(np.linalg.norm(mapped, axis=1), 1.0, atol=1e-5)
    assert np.allclose(mapped[:, 10:], 0.0) and not np.allclose(mapped[:, :10], 0.0)
