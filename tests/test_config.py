import pytest

from pipeline.config import CONF_DIR, GROUPS, Config, ConfigError, load_config, options


def test_defaults_and_overrides():
    cfg = load_config(["data=multi30k", "data.root=/x", "model.hidden_size=512", "train.lr=1e-3", "train.use_gpu=true"])
    assert cfg.data.name == "multi30k" and cfg.data.root == "/x"
    assert cfg.model.hidden_size == 512 and cfg.train.lr == 0.001 and cfg.train.use_gpu is True
    assert cfg.flat()["model.hidden_size"] == 512


@pytest.mark.parametrize("group", GROUPS)
def test_every_yaml_option_loads(group):
    opts = options(group)
    assert opts, f"no options in {CONF_DIR / group}"
    for opt in opts:
        overrides = [f"{group}={opt}"]
        if group == "data" and opt == "pairs":
            overrides += ["data.src_files=a", "data.tgt_files=b"]
        if group == "data" and opt == "table":
            overrides += ["data.files=a.tsv"]
        if group == "data" and opt == "video_features":
            overrides += ["data.files=feats/*.npy", "data.captions_file=captions.txt"]
        assert isinstance(load_config(overrides), Config)


@pytest.mark.parametrize("override,message", [
    (["model.hidden=3"], "unknown config key 'model.hidden'; valid keys: model.embedding_size, model.hidden_size"),
    (["model.hidden_size=abc"], "model.hidden_size must be of type int, got 'abc'"),
    (["train.use_gpu=3"], "train.use_gpu must be of type bool"),
    (["data=nope"], "no option 'nope' for config group 'data'; choose one of: demo_text, demo_video, msrvtt, msvd, multi30k"),
    (["model.attention=luong"], "model.attention='luong' is not a valid choice; choose one of: dot, general, mlp"),
    (["modl.hidden_size=3"], "unknown config key 'modl'; valid keys: data, model, train, tracking"),
    (["hidden_size"], "must look like key=value"),
    (["model.hidden_size=255"], "positive even number"),
    (["data=pairs"], "data=pairs needs data.src_files and data.tgt_files"),
    (["data=video_features"], "data=video_features needs data.files"),
    (["data=demo_video", "data.frame_encoder=frozen"], "data.frame_encoder=frozen needs data.backbone"),
    (["data=msrvtt", "data.num_frames=0"], "need data.num_frames >= 1"),
])
def test_bad_config_is_named(override, message):
    with pytest.raises(ConfigError) as e:
        load_config(override)
    assert message in str(e.value)


def test_round_trip_through_dict():
    cfg = load_config(["model.num_layers=3"])
    assert Config.from_dict(cfg.to_dict()) == cfg
    with pytest.raises(ConfigError, match="unknown config key 'train.bogus'"):
        Config.from_dict({**cfg.to_dict(), "train": {"bogus": 1}})
