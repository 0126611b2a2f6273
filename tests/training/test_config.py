import pytest

from gnnmegatron.training.config import ConfigError, ParallelConfig, apply_overrides, config_from_dict, load_config
from gnnmegatron.training.optim import lr_at
from gnnmegatron.training.config import OptimConfig


def test_demo_config_loads_and_builds_model_config():
    from gnnmegatron.cli import DEMO_CONFIG

    cfg = load_config(DEMO_CONFIG)
    mcfg = cfg.model_config()
    assert mcfg.cutoff == cfg.data.cutoff
    assert cfg.train.max_steps > 0


@pytest.mark.parametrize("name, second", [("demo_sources.yaml", "oxides"), ("demo_sources_embedded.yaml", "emt-ref")])
def test_multisource_demo_configs_load(name, second):
    from gnnmegatron.cli import DEMO_CONFIG

    cfg = load_config(DEMO_CONFIG.parent / name)
    mcfg = cfg.model_config()
    assert mcfg.sources == ["emt", second] and mcfg.heads == "per_source" and mcfg.multi_source
    assert [s.splits for s in cfg.data.source_list()][0] == (0.9, 0.05, 0.05)


@pytest.mark.parametrize("values, message", [
    ({"data": {"splits": [0.5, 0.5, 0.5]}}, "summing to 1"),
    ({"data": {"cutoff": -1}}, "data.cutoff must be > 0"),
    ({"optim": {"lr": 0}}, "optim.lr must be > 0"),
    ({"loss": {"kind": "l3"}}, "loss.kind"),
    ({"loss": {"energy_weight": 0, "force_weight": 0}}, "all weights are zero"),
    ({"train": {"max_stepz": 3}}, "unknown key(s) ['max_stepz'] in train"),
    ({"trian": {}}, "unknown top-level key(s) ['trian']"),
    ({"model": {"hidden": 3}}, "model.preset is required"),
])
def test_bad_values_name_the_field(values, message):
    with pytest.raises(ConfigError) as err:
        config_from_dict(values)
    assert message in str(err.value)


def test_layout_must_divide_world_size():
    with pytest.raises(ConfigError, match=r"tp\*pp\*dp=2\*1\*1=2 but world size is 4"):
        ParallelConfig(tp=2, pp=1, dp=1).resolve(4)
    assert ParallelConfig(tp=2).resolve(8).dp == 4


def test_overrides_parse_yaml_values():
    values = apply_overrides({}, ["optim.lr=3e-4", "train.max_steps=7", "data.splits=[0.8,0.1,0.1]"])
    cfg = config_from_dict(values)
    assert cfg.optim.lr == 3e-4 and cfg.train.max_steps == 7 and cfg.data.splits == (0.8, 0.1, 0.1)
    with pytest.raises(ConfigError, match="section.key=value"):
        apply_overrides({}, ["optim.lr"])


def test_model_cutoff_must_match_data_cutoff():
    cfg = config_from_dict({"model": {"preset": "egnn-tiny", "cutoff": 4.0}, "data": {"cutoff": 5.0}})
    with pytest.raises(ConfigError, match="model.cutoff=4.0 differs from data.cutoff=5.0"):
        cfg.model_config()


def test_warmup_cosine_schedule():
    cfg = OptimConfig(lr=1.0, warmup_steps=10, min_lr_ratio=0.1)
    lrs = [lr_at(s, cfg, 110) for s in range(111)]
    assert lrs[0] == pytest.approx(0.1) and lrs[9] == pytest.approx(1.0)
    assert all(a >= b for a, b in zip(lrs[10:], lrs[11:]))  # monotone decay after warm-up
    assert lrs[60] == pytest.approx(0.55)  # half-way through the cosine
    assert lrs[110] == pytest.approx(0.1)


def test_yaml_exponent_strings_become_numbers():
    cfg = config_from_dict({"optim": {"lr": "1e-3", "warmup_steps": "5"}})
    assert cfg.optim.lr == 1e-3 and cfg.optim.warmup_steps == 5
    with pytest.raises(ConfigError, match=r"optim.lr must be a number, got 'fast'"):
        config_from_dict({"optim": {"lr": "fast"}})


def test_yaml_errors_and_unknown_emt_settings_name_their_place(tmp_path):
    broken = tmp_path / "broken.yaml"
    broken.write_text("data: [1,2\n")
    with pytest.raises(ConfigError, match=r"config file .*broken.yaml is not valid YAML"):
        load_config(broken)
    with pytest.raises(ConfigError, match=r"override 'data.splits=\[0.9': the value is not valid YAML"):
        apply_overrides({}, ["data.splits=[0.9"])
    with pytest.raises(ConfigError, match=r"data.emt: unknown setting\(s\) \['num_structure'\].*'num_structures'"):
        config_from_dict({"data": {"emt": {"num_structure": 50}}})
    with pytest.raises(ConfigError, match=r"data.sources entry 'b'.emt: unknown setting\(s\) \['sede'\]"):
        config_from_dict({"data": {"sources": [{"store": "a.zarr"},
                                               {"store": "b.zarr", "name": "b", "emt": {"sede": 1}}]}})
    assert config_from_dict({"data": {"emt": {"num_structures": 50, "seed": 3}}}).data.emt["seed"] == 3
