import pytest
import yaml

from lucatrain.config import Config, ConfigError, load_config, shipped_recipes
from lucatrain.families.lucaone import TASK_NAMES


def test_defaults_validate():
    cfg = load_config()
    assert isinstance(cfg, Config)
    assert cfg.tasks.names == ["gene_mask", "prot_mask"]


@pytest.mark.parametrize("name", shipped_recipes())
def test_every_shipped_recipe_loads_and_validates(name):
    cfg = load_config(name)  # raises ConfigError on any bad key or value
    assert cfg.validate() is cfg
    assert cfg.data.max_length <= cfg.model.max_position_embeddings
    assert cfg.model.hidden_size % cfg.model.num_attention_heads == 0
    assert set(cfg.tasks.names) <= set(TASK_NAMES)


def test_lucavirus_recipe_sizes():
    cfg = load_config("lucavirus_v1.0")
    assert (cfg.model.num_hidden_layers, cfg.model.hidden_size, cfg.model.num_attention_heads) == (12, 2560, 20)
    assert cfg.data.max_length == 3074
    assert cfg.tasks.selected() == ["gene_mask", "prot_mask", "gene_type", "prot_homo", "prot_site", "prot_domain",
                                    "gene_taxonomy", "prot_taxonomy", "prot_keyword"]  # fmt: skip
    assert len(load_config("lucaone_v2.0").tasks.selected()) == 10


def test_precedence_cli_over_yaml_over_defaults(tmp_path):
    recipe = tmp_path / "r.yaml"
    recipe.write_text(yaml.safe_dump({"train": {"gradient_accumulation_steps": 4, "max_steps": 50, "warmup_steps": 5}}))
    cfg = load_config(recipe, ["train.gradient_accumulation_steps=32", "train.learning_rate=1e-4", "data.train_files=[a.csv, b.fa]"])
    assert cfg.train.gradient_accumulation_steps == 32  # CLI beats YAML
    assert cfg.train.max_steps == 50  # YAML beats default
    assert cfg.train.batch_size == 8  # default
    assert cfg.train.learning_rate == 1e-4
    assert cfg.data.train_files == ["a.csv", "b.fa"]


def test_resolved_config_round_trips(tmp_path):
    cfg = load_config("demo_tiny", ["train.max_steps=70"])
    cfg.save(tmp_path / "config.yaml")
    again = load_config(tmp_path / "config.yaml")
    assert again == cfg


@pytest.mark.parametrize(
    "override,fragment",
    [
        ("train.gradient_acumulation_steps=3", "unknown config key `train.gradient_acumulation_steps`"),
        ("trian.max_steps=3", "unknown config section `trian`"),
        ("train.lr_scheduler=step", "`train.lr_scheduler` must be one of ['linear', 'cosine', 'constant', 'one_cycle']"),
        ("train.batch_size=0", "`train.batch_size` must be > 0"),
        ("train.batch_size=abc", "`train.batch_size` must be an integer"),
        ("data.bad_records=ignore", "`data.bad_records` must be one of ['fail', 'skip']"),
        ("tasks.names=[gene_mask, prot_mlm]", "unknown task 'prot_mlm'; valid tasks are"),
        ("model.num_attention_heads=7", "must be divisible by `model.num_attention_heads`"),
        ("deepspeed.precision=fp8", "`deepspeed.precision` must be one of ['fp32', 'bf16', 'fp16']"),
        ("deepspeed.config=zero9", "shipped configs are"),
        ("train.warmup_steps=5000", "`train.warmup_steps` (5000) exceeds `train.max_steps`"),
        ("data.max_tokens=100", "`data.max_tokens` (100) must be >= `data.max_length`"),
        ("max_steps=3", "must be `section.key=value`"),
    ],
)
def test_bad_keys_and_values_name_the_key(override, fragment):
    with pytest.raises(ConfigError) as err:
        load_config("demo_tiny", [override])
    assert fragment in str(err.value)


def test_missing_recipe_lists_shipped(tmp_path):
    with pytest.raises(ConfigError, match="shipped recipes are"):
        load_config(tmp_path / "nope.yaml")


def test_lists_and_dicts_are_typed_element_by_element():
    cfg = load_config(None, ["data.dev_splits={seen: [a.csv], unseen: [b.csv, c.csv]}", "tasks.classifier_sizes={prot_site: 16}"])
    assert cfg.data.dev_splits == {"seen": ["a.csv"], "unseen": ["b.csv", "c.csv"]}
    with pytest.raises(ConfigError, match=r"`tasks.classifier_sizes.prot_site` must be an integer, got 'big'"):
        load_config(None, ["tasks.classifier_sizes={prot_site: big}"])
    with pytest.raises(ConfigError, match=r"`data.dev_splits.seen` must be a list"):
        load_config(None, ["data.dev_splits={seen: 3}"])
    with pytest.raises(ConfigError, match=r"`tasks.weights.gene_mask` must be a number"):
        load_config(None, ["tasks.weights={gene_mask: [1]}"])


def test_family_sections_are_registered_and_checked():
    from lucatrain.config import section_names

    assert {"tasks", "finetune"} <= set(section_names())  # added by the LucaOne and fine-tuning families
    cfg = load_config(None, ["model.model_type=seq_finetune", "finetune.pooling=mean"])
    assert cfg.finetune.pooling == "mean" and cfg.to_dict()["finetune"]["pooling"] == "mean"
    with pytest.raises(ConfigError, match=r"unknown config key `finetune.polling`; valid keys in `finetune` are"):
        load_config(None, ["finetune.polling=mean"])
    with pytest.raises(ConfigError, match=r"unknown config section `clip`; valid sections are \[.*'tasks', 'finetune', 'simclr'\]"):
        load_config(None, ["clip.batch_size=8"])
    # A saved config.yaml loads back to the same values, family sections included.
    assert load_config(None, []).to_dict() == Config().to_dict()


def test_lucaone_style_flag_gets_a_hint():
    with pytest.raises(ConfigError, match=r"lucatrain takes `section.key=value`, e.g. `train.max_steps=...`"):
        load_config(None, ["--max_steps"])


def test_a_family_section_may_nest_sections():
    """A family's config may hold nested dataclasses (e.g. CLIBD's `lr_config: {lr, max_lr}`): each level's
    keys and types are checked and errors name the full dotted key."""
    from dataclasses import dataclass, field

    from lucatrain import config as config_module

    @dataclass
    class LrConfig:
        lr: float = 1e-6
        max_lr: float = 5e-5

        def validate(self):
            if self.max_lr < self.lr:
                raise ConfigError("`toy.lr_config.max_lr` must be >= `toy.lr_config.lr`")

    @dataclass
    class ToySection:
        lr_config: LrConfig = field(default_factory=LrConfig)
        towers: list[int] = field(default_factory=lambda: [1])

        def validate(self):
            self.lr_config.validate()

    config_module.register_section("toy", ToySection)
    try:
        cfg = load_config(None, ["toy.lr_config.max_lr=1e-4", "toy.towers=[2, 3]"])
        assert cfg.toy.lr_config.max_lr == 1e-4 and cfg.toy.lr_config.lr == 1e-6 and cfg.toy.towers == [2, 3]
        with pytest.raises(ConfigError, match=r"unknown config key `toy.lr_config.maxlr`"):
            load_config(None, ["toy.lr_config.maxlr=1"])
        with pytest.raises(ConfigError, match=r"`toy.towers\[1\]` must be an integer, got 'b'"):
            load_config(None, ["toy.towers=[1, b]"])
    finally:
        del config_module.FAMILY_SECTIONS["toy"]


def test_ds_config_leaves_contiguous_gradients_to_the_world_size_unless_set(tmp_path):
    """ZeRO-1/2 with `contiguous_gradients` unset: on for several processes (the partitioned reduction
    uses it), off for one (nothing to partition: the buffer is only a copy). A JSON that sets it wins."""
    import json

    from lucatrain.engine import build_ds_config

    cfg = load_config("demo_tiny", ["deepspeed.config=zero2"])
    assert build_ds_config(cfg, 1)["zero_optimization"]["contiguous_gradients"] is False
    assert build_ds_config(cfg, 2)["zero_optimization"]["contiguous_gradients"] is True
    own = tmp_path / "own.json"
    own.write_text(json.dumps({"zero_optimization": {"stage": 2, "contiguous_gradients": True}}))
    assert build_ds_config(load_config("demo_tiny", [f"deepspeed.config={own}"]), 1)["zero_optimization"]["contiguous_gradients"] is True
    assert "contiguous_gradients" not in build_ds_config(load_config("demo_tiny", ["deepspeed.config=zero0"]), 1)["zero_optimization"]
