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


@pytest.mark.parametrize(
    "override,message",
    [
        (["model.hidden=3"], "unknown config key 'model.hidden'; valid keys: model.embedding_size, model.hidden_size"),
        (["model.hidden_size=abc"], "model.hidden_size must be of type int, got 'abc'"),
        (["train.use_gpu=3"], "train.use_gpu must be of type bool"),
        (
            ["data=nope"],
            "no option 'nope' for config group 'data'; choose one of: demo_text, demo_video, msrvtt, msvd, multi30k",
        ),
        (["model.attention=luong"], "model.attention='luong' is not a valid choice; choose one of: dot, general, mlp"),
        (["modl.hidden_size=3"], "unknown config key 'modl'; valid keys: data, model, train, tracking"),
        (["hidden_size"], "must look like key=value"),
        (["model.hidden_size=255"], "positive even number"),
        (["data=pairs"], "data=pairs needs data.src_files and data.tgt_files"),
        (["data=video_features"], "data=video_features needs data.files"),
        (["data=demo_video", "data.frame_encoder=frozen"], "data.frame_encoder=frozen needs data.backbone"),
        (["data=msrvtt", "data.num_frames=0"], "need data.num_frames >= 1"),
        (
            ["data=msrvtt", "data.frame_size=16", "model.frame_shift=8"],
            "model.frame_shift=8 must be less than half of data.frame_size=16",
        ),
    ],
)
def test_bad_config_is_named(override, message):
    with pytest.raises(ConfigError) as e:
        load_config(override)
    assert message in str(e.value)


def test_round_trip_through_dict():
    cfg = load_config(["model.num_layers=3"])
    assert Config.from_dict(cfg.to_dict()) == cfg
    with pytest.raises(ConfigError, match="unknown config key 'train.bogus'"):
        Config.from_dict({**cfg.to_dict(), "train": {"bogus": 1}})


# One bad value per numeric key, at the edge of its range where there is one.
BAD_VALUES = {
    "data.num_frames": 0,
    "data.fps": -1.0,
    "data.frame_size": 7,
    "data.max_chars": 0,
    "data.min_tokens": 0,
    "data.max_tokens": 0,
    "data.vocab_size": 99,
    "data.tokenizer_max_lines": 0,
    "data.val_fraction": 0.5,
    "data.test_fraction": -0.1,
    "data.demo_size": 0,
    "model.embedding_size": 0,
    "model.hidden_size": 255,
    "model.num_layers": 0,
    "model.dropout": 1.0,
    "model.cnn_channels": 0,
    "model.frame_shift": -1,
    "train.num_workers": 0,
    "train.cpus_per_worker": -1,
    "train.gpus_per_worker": 1.5,
    "train.max_epochs": -1,  # 0 = from the corpus
    "train.max_minutes": -1.0,
    "tracking.system_metrics_s": -1.0,
    "train.max_failures": -2,
    "train.min_workers": -1,
    "train.resize_interval_s": -1.0,
    "train.max_preemption_failures": -2,
    "train.preemption_check_s": 0.0,
    "train.seed": -1,
    "train.batch_tokens": 15,  # 0 = from the corpus
    "train.sort_window": 0,
    "train.lr": 0.0,
    "train.weight_decay": -0.1,
    "train.warmup_steps": -1,
    "train.clip_norm": -1.0,
    "train.accumulate": 0,
    "train.ddp_bucket_mb": 0,
    "train.label_smoothing": 1.0,
    "train.eval_every": -1,
    "train.eval_beam_size": 0,
    "train.test_beam_size": 0,
    "train.length_penalty": -0.1,
    "train.early_stopping": -1,
    "train.log_samples": -1,
    "train.in_memory_mb": -1,
    "tune.num_samples": 0,
    "tune.grace_period": 0,
    "tune.reduction_factor": 1,
    "tune.max_concurrent_trials": -1,
}


def _numeric_keys():
    import dataclasses
    import typing

    cfg = Config()
    for group in GROUPS:
        sub = getattr(cfg, group)
        hints = typing.get_type_hints(type(sub))
        for f in dataclasses.fields(sub):
            if hints[f.name] in (int, float):  # bool is its own type here, not int
                yield f"{group}.{f.name}"


def test_every_numeric_key_has_a_range_rule_and_a_bad_value():
    from pipeline.config import RANGES

    keys = set(_numeric_keys())
    assert len(keys) > 40
    assert keys - set(RANGES) == set(), "numeric keys without a range rule"
    assert set(RANGES) - keys == set(), "rules for keys that do not exist"
    assert set(BAD_VALUES) == keys, "the table below must cover every numeric key"


@pytest.mark.parametrize("key", sorted(BAD_VALUES))
def test_out_of_range_value_is_refused_naming_the_key(key):
    group, name = key.split(".")
    with pytest.raises(ConfigError) as e:
        Config.from_dict({group: {name: BAD_VALUES[key]}})
    assert str(e.value).startswith(f"{key} must be "), str(e.value)
    assert repr(BAD_VALUES[key]) in str(e.value) or str(BAD_VALUES[key]) in str(e.value)


@pytest.mark.parametrize(
    "value,ok", [(0.25, True), (1.0, True), (2.0, True), (4.0, True), (0.0, False), (1.5, False), (-1.0, False)]
)
def test_gpus_per_worker_is_a_share_of_one_gpu_or_whole_gpus(value, ok):
    if ok:
        assert Config.from_dict({"train": {"gpus_per_worker": value}}).train.gpus_per_worker == value
    else:
        with pytest.raises(ConfigError, match=r"train.gpus_per_worker must be in \(0, 1\] or a whole number"):
            Config.from_dict({"train": {"gpus_per_worker": value}})


def test_edges_that_mean_off_or_forever_are_valid():
    cfg = load_config(
        [
            "train.max_failures=-1",
            "train.max_preemption_failures=-1",
            "train.min_workers=0",
            "train.resize_interval_s=0",
            "train.max_minutes=0",
            "train.eval_every=0",
            "train.early_stopping=0",
            "train.clip_norm=0",
            "train.warmup_steps=0",
            "train.log_samples=0",
            "data.fps=0",
            "tune.max_concurrent_trials=0",
            "train.seed=0",
            "data.val_fraction=0",
        ]
    )
    assert cfg.train.max_failures == -1


def test_min_workers_above_num_workers_is_refused_naming_both():
    with pytest.raises(ConfigError, match=r"need train.min_workers <= train.num_workers .*got 3 > 2"):
        load_config(["train.num_workers=2", "train.min_workers=3"])
    assert load_config(["train.num_workers=3", "train.min_workers=1"]).train.min_workers == 1


@pytest.mark.parametrize("text", [".inf", ".nan", "-.inf"])
def test_infinite_or_nan_floats_are_refused(text):
    with pytest.raises(ConfigError, match="train.lr must be > 0"):
        load_config([f"train.lr={text}"])


def test_search_space_values_are_range_checked():
    with pytest.raises(ConfigError, match=r"tune.space.model.dropout must be in \[0, 1\), got 1.5"):
        load_config(["tune.space.model.dropout=[0.1, 1.5]"])
    with pytest.raises(ConfigError, match=r"tune.space.train.lr must be > 0"):
        load_config(["tune.search=random", "tune.space.train.lr={uniform: [-1, 0.1]}"])


def _name_keys():
    from pipeline.config import NAMES

    return sorted(NAMES)


# Path climbing, separators, quotes (MLflow filter strings), a leading dot, control characters, length.
BAD_NAMES = ["../x", "a/b", "a\\b", "x..y", "..", "it's", 'say"hi', ".hidden", "-x", "a\nb", "x" * 300, "a;b", "a`b"]


@pytest.mark.parametrize("key", _name_keys())
@pytest.mark.parametrize("value", BAD_NAMES)
def test_unsafe_names_are_refused_naming_the_key_and_the_set(key, value):
    group, name = key.split(".")
    with pytest.raises(ConfigError) as e:
        Config.from_dict({group: {name: value}})
    msg = str(e.value)
    assert msg.startswith(f"{key}=") and "is not a safe name: use letters, digits" in msg, msg


@pytest.mark.parametrize("key", _name_keys())
def test_safe_names_pass(key):
    group, name = key.split(".")
    for value in ["en", "pt_BR", "zh-Hans"] if key.endswith("_lang") else ["run-1", "e2e_2.b", "test_2016_flickr"]:
        assert getattr(getattr(Config.from_dict({group: {name: value}}), group), name) == value
    if key == "tracking.experiment":  # MLflow experiment names often have spaces
        assert (
            Config.from_dict({"tracking": {"experiment": "My experiment 2"}}).tracking.experiment == "My experiment 2"
        )
    else:
        with pytest.raises(ConfigError, match="not a safe name"):
            Config.from_dict({group: {name: "a b"}})
    if not key.endswith("_lang"):  # "" = pick one; a language must be named
        Config.from_dict({group: {name: ""}})
    else:
        with pytest.raises(ConfigError, match="not a safe name"):
            Config.from_dict({group: {name: ""}})


# One source of defaults: the dataclasses. conf/ holds only what each option changes.


@pytest.mark.parametrize("group", GROUPS)
def test_no_overrides_gives_the_dataclass_defaults(group):
    assert getattr(load_config([]), group) == getattr(Config(), group)
    assert load_config([]) == Config()


def _option_files():
    from pipeline.config import OPTION_GROUPS

    for group in OPTION_GROUPS:
        for opt in options(group):
            yield group, opt


def _restated(group, keys):
    """Keys of a group whose value (after the schema's coercion) is the dataclass default."""
    from pipeline.config import set_key

    default, cfg = Config(), Config()
    same = []
    for key, value in keys.items():
        set_key(cfg, f"{group}.{key}", value)
        if getattr(getattr(cfg, group), key) == getattr(getattr(default, group), key):
            same.append(f"{group}.{key}")
    return same


@pytest.mark.parametrize(("group", "opt"), list(_option_files()))
def test_each_yaml_sets_only_what_differs_from_the_defaults(group, opt):
    from pipeline.config import read_option, read_recipe

    if group == "recipe":
        by_group = {}
        for dotted, value in read_recipe(opt):
            g, k = dotted.split(".", 1)
            by_group.setdefault(g, {})[k] = value
        restated = [k for g, keys in by_group.items() for k in _restated(g, keys)]
    else:
        keys, _ = read_option(group, opt)  # refuses keys of other groups
        restated = _restated(group, keys)
    assert not restated, f"conf/{group}/{opt}.yaml restates defaults from pipeline/config.py: {restated}"


def test_the_default_options_are_empty():
    import yaml

    from pipeline.config import read_option

    defaults = yaml.safe_load((CONF_DIR / "config.yaml").read_text())["defaults"]
    assert defaults["recipe"] == "none"
    for group in GROUPS:
        assert read_option(group, defaults[group]) == ({}, None)


@pytest.mark.parametrize("opt", options("recipe"))
def test_every_recipe_loads(opt):
    assert isinstance(load_config([f"recipe={opt}"]), Config)


# Recipes: settings across groups, named by a data option, never over an option the user picked.


@pytest.mark.parametrize("data", ["demo_video", "msrvtt", "msvd", "video_features"])
def test_every_video_data_option_brings_the_video_recipe(data):
    from pipeline.config import compose, read_recipe

    need = ["data.files=f/*.npy", "data.captions_file=c.txt"] if data == "video_features" else []
    cfg, how = compose([f"data={data}", *need])
    assert how.choices["recipe"] == "video" and how.recipe_from == f"data={data}"
    assert f"recipe=video (named by data={data})" in how.summary()
    for dotted, value in read_recipe("video"):
        group, key = dotted.split(".")
        assert getattr(getattr(cfg, group), key) == value
    # batch_tokens 0: sized from the corpus when the run starts (the demo's gets 800).
    assert (cfg.model.num_layers, cfg.train.batch_tokens, cfg.train.lr, cfg.train.log_samples) == (1, 0, 0.001, 6)
    assert cfg.data.name == data
    assert load_config([f"data={data}", *need, "recipe=video"]) == cfg
    assert load_config([f"data={data}", *need, "recipe=none"]).train == Config().train
    assert load_config(["data=demo_video"]).data.vocab_size == 200


def test_recipe_none_turns_it_off():
    cfg = load_config(["data=demo_video", "recipe=none"])
    assert cfg.model == Config().model and cfg.train == Config().train
    assert cfg.data == load_config(["data=demo_video"]).data


def test_a_picked_model_or_train_option_wins_over_the_recipe():
    from pipeline.config import compose

    recipe = load_config(["data=demo_video"])
    small, how = compose(["data=demo_video", "model=small"])
    assert small.model == load_config(["model=small"]).model  # the whole option, none of the recipe's model keys
    assert small.train == recipe.train  # the recipe's train keys still apply
    assert how.not_over == ["model"] and "not over model=small" in how.summary()
    demo = load_config(["data=demo_video", "train=demo"])
    assert demo.train == load_config(["train=demo"]).train and demo.model == recipe.model
    # Even picking the default option keeps the recipe off that group.
    assert load_config(["data=demo_video", "train=default"]).train == Config().train
    both = load_config(["data=demo_video", "model=small", "train=demo"])  # what `pipeline demo data=demo_video` gets
    assert both.model == load_config(["model=small"]).model and both.train == load_config(["train=demo"]).train


def test_key_overrides_win_over_the_recipe():
    cfg = load_config(["data=demo_video", "train.lr=0.01", "model.num_layers=3"])
    assert cfg.train.lr == 0.01 and cfg.model.num_layers == 3 and cfg.train.batch_tokens == 0


def test_a_recipe_can_be_picked_for_any_data():
    cfg = load_config(["recipe=video"])
    assert cfg.data == Config().data and cfg.model.num_layers == 1 and cfg.train.batch_tokens == 0


def test_an_option_setting_other_groups_keys_is_refused(tmp_path, monkeypatch):
    import pipeline.config as config

    (tmp_path / "data").mkdir()
    (tmp_path / "recipe").mkdir()
    (tmp_path / "config.yaml").write_text("defaults: {data: x}\n")
    (tmp_path / "data" / "x.yaml").write_text("vocab_size: 300\nmodel: {num_layers: 1}\n")
    monkeypatch.setattr(config, "CONF_DIR", tmp_path)
    with pytest.raises(ConfigError, match=r"x.yaml: sets model\.\* keys, but an option sets only data\.\* keys"):
        load_config([])
    (tmp_path / "data" / "x.yaml").write_text("defaults: {recipe: r}\nvocab_size: 300\n")
    (tmp_path / "recipe" / "r.yaml").write_text("model: {num_layers: 1}\n")
    assert load_config([]).model.num_layers == 1
    (tmp_path / "data" / "x.yaml").write_text("defaults: {model: small}\n")
    with pytest.raises(ConfigError, match="'defaults' may only name a recipe"):
        load_config([])


def test_renamed_key_is_refused_naming_the_new_one():
    for bad in (["train.num_samples=3"], ["tune.search=grid", "tune.space.train.num_samples=[1, 2]"]):
        with pytest.raises(ConfigError, match=r"'train.num_samples' was renamed to train.log_samples"):
            load_config(bad)
    with pytest.raises(ConfigError, match="renamed to train.log_samples"):
        Config.from_dict({"train": {"num_samples": 3}})
    assert load_config(["train.log_samples=3", "tune.num_samples=4"]).train.log_samples == 3


def test_train_amp_is_refused_naming_train_amp_dtype():
    for bad in (["train.amp=false"], ["tune.search=grid", "tune.space.train.amp=[true, false]"]):
        with pytest.raises(ConfigError, match=r"'train.amp' was renamed to train.amp_dtype \(auto\|bf16\|fp16\|fp32"):
            load_config(bad)
    assert load_config([]).train.amp_dtype == "auto"
    assert load_config(["train=gpu"]).train.amp_dtype == "auto"
    with pytest.raises(ConfigError, match="train.amp_dtype='fp8' is not a valid choice; choose one of: auto, bf16"):
        load_config(["train.amp_dtype=fp8"])
    with pytest.raises(ConfigError, match=r"train.amp_dtype=fp16 needs GPUs \(train.use_gpu=true"):
        load_config(["train.amp_dtype=fp16"])
    assert load_config(["train.amp_dtype=fp16", "train.use_gpu=true"]).train.amp_dtype == "fp16"
    assert load_config(["train.amp_dtype=bf16"]).train.amp_dtype == "bf16"


def test_two_ranks_are_never_placed_on_one_gpu():
    with pytest.raises(
        ConfigError, match=r"train.gpus_per_worker=0.5 with train.num_workers=2 would place two ranks of one NCCL group"
    ):
        load_config(["train.use_gpu=true", "train.num_workers=2", "train.gpus_per_worker=0.5"])
    # One worker per run may share a GPU (sweep trials); whole GPUs per rank are fine; CPU runs ignore the key.
    for ok in (
        ["train.use_gpu=true", "train.num_workers=1", "train.gpus_per_worker=0.5"],
        ["train.use_gpu=true", "train.num_workers=4", "train.gpus_per_worker=1"],
        ["train.use_gpu=true", "train.num_workers=2", "train.gpus_per_worker=2"],
        ["train.num_workers=2", "train.gpus_per_worker=0.5"],
    ):
        load_config(ok)
