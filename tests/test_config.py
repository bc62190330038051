import pytest

from clipteacher.train.config import ConfigError, Config, apply_overrides, from_dict, load_config, save_config


def test_overrides_and_types(tmp_path):
    cfg = apply_overrides(Config(), ["train.iters=7", "loss.glm_weight=0", "plm.windows=[2,5]", "teacher.kind=clip"])
    assert cfg.train.iters == 7 and cfg.loss.glm_weight == 0.0 and cfg.plm.windows == (2, 5)
    save_config(cfg, tmp_path / "c.yaml")
    again = load_config(tmp_path / "c.yaml")
    assert again == cfg


@pytest.mark.parametrize("override", ["train.itres=3", "nosection.x=1", "train=3"])
def test_unknown_keys_are_rejected_with_the_key_named(override):
    with pytest.raises(ConfigError, match=override.split("=")[0].replace(".", r"\.")):
        apply_overrides(Config(), [override])


def test_wrong_type_is_rejected():
    with pytest.raises(ConfigError, match="train.iters"):
        from_dict({"train": {"iters": "many"}})


def test_missing_config_file(tmp_path):
    with pytest.raises(ConfigError, match="not found"):
        load_config(tmp_path / "nope.yaml")


def test_shipped_configs_load():
    for name in ["msrc21", "siftflow", "default_model", "voc", "coco_stuff", "context"]:
        load_config(f"training/configs/{name}.yaml")
