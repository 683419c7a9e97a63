from pathlib import Path

import pytest
import yaml

from conftest import REPO
from cotrec.config import load_config, preset_names
from cotrec.errors import ConfigError


def test_presets_load_and_validate():
    assert {"demo", "ml-100k", "ml-1m"} <= set(preset_names())
    for name in preset_names():
        config = load_config(name)
        assert config.name == name


def test_overrides_are_typed_and_nested():
    config = load_config("demo", ["data.k_core=10", "data.sample_users=null", "seed=3", "data.dedupe=false"])
    assert config.data.k_core == 10 and config.data.sample_users is None
    assert config.seed == 3 and config.data.dedupe is False


def test_unknown_key_is_named():
    with pytest.raises(ConfigError, match=r"data\.k_cor: unknown key"):
        load_config("demo", ["data.k_cor=3"])


def test_wrong_type_and_range_are_named():
    with pytest.raises(ConfigError, match=r"data\.k_core"):
        load_config("demo", ["data.k_core=five"])
    with pytest.raises(ConfigError, match=r"data\.sample_users"):
        load_config("demo", ["data.sample_users=0"])


def test_custom_resources_are_named_amounts_and_bad_ones_name_their_key():
    config = load_config("demo", ["extract.resources={extract_node: 1}", "ranker.resources={rank_node: 0.5}"])
    assert config.extract.resources == {"extract_node": 1.0} and config.ranker.resources == {"rank_node": 0.5}
    assert config.retriever.resources == {} and config.embed.resources == {}
    for override, error in (("retriever.resources={GPU: 1}", r"retriever\.resources: 'GPU' is Ray's own resource"),
                            ("embed.resources={node_x: 0}", r"embed\.resources: 'node_x' must ask for an amount above 0"),
                            ("ranker.resources={node_x: many}", r"ranker\.resources\.node_x: Input should be a valid number")):
        with pytest.raises(ConfigError, match=rf"^config preset 'demo': {error}"):
            load_config("demo", [override])


def test_local_sources_need_a_path():
    with pytest.raises(ConfigError, match=r"data: .*needs data.path"):
        load_config("demo", ["data.source=mind"])
    with pytest.raises(ConfigError, match="not used by source 'ml-100k'"):
        load_config("demo", ["data.path=/tmp"])


def test_yaml_file_errors_name_the_file_and_line(tmp_path: Path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("name: x\ndata:\n  source: ml-100k\n   k_core: [\n")
    with pytest.raises(ConfigError, match=r"bad\.yaml line \d+: invalid YAML"):
        load_config(str(bad))
    with pytest.raises(ConfigError, match="no such file and no preset"):
        load_config(str(tmp_path / "missing.yaml"))


def test_yaml_file_round_trips(tmp_path: Path):
    config = load_config("ml-100k", ["data.k_core=7"])
    path = tmp_path / "resolved.yaml"
    path.write_text(config.to_yaml())
    again = load_config(str(path))
    assert again == config
    assert yaml.safe_load(path.read_text())["data"]["k_core"] == 7


def test_fingerprint_follows_the_sections_a_stage_reads():
    base = load_config("demo")
    assert base.fingerprint("data") == load_config("demo", ["seed=9"]).fingerprint("data")
    assert base.fingerprint("data") != load_config("demo", ["data.k_core=6"]).fingerprint("data")


def test_every_cuda_engine_a_preset_places_holds_a_gpu():
    """Extraction actors, the ranker's workers and the served Ranker get GPUs wherever the engine is
    CUDA; a config that places one without a GPU is refused in one line naming the key."""
    from cotrec.serve_app import ranker_resources

    cuda = [name for name in preset_names() if load_config(name).llm.device == "cuda"]
    assert cuda == ["gpu-cluster"]
    for name in cuda:
        config = load_config(name)
        assert config.extract.gpus_per_actor >= 1 and config.ranker.gpus_per_worker >= 1
        assert ranker_resources(config)["num_gpus"] >= 1
    for key in ("extract.gpus_per_actor", "ranker.gpus_per_worker"):
        with pytest.raises(ConfigError, match=f"^config preset 'gpu-cluster': {key}: llm.device is cuda"):
            load_config("gpu-cluster", [f"{key}=0"])
