import pytest

from clipteacher.config import ConfigError, Config, apply_overrides, from_dict, load_config, save_config


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


@pytest.mark.parametrize("argv", [["--resume", "train.out_dir=OUT", "train.iters=7"],
                                  ["train.out_dir=OUT", "--resume", "train.iters=7"],
                                  ["--resume", "train.iters=7", "train.out_dir=OUT"]])
def test_resume_without_a_path_keeps_the_overrides_after_it(argv, tmp_path, monkeypatch):
    import clipteacher.train.engine as engine
    from clipteacher.cli.train import main

    seen = {}
    monkeypatch.setattr(engine, "train", lambda cfg, resume, verbose: seen.update(cfg=cfg, resume=resume) or {})
    out = str(tmp_path / "run")
    assert main([a.replace("OUT", out) for a in argv]) == 0
    assert seen["resume"] == "auto" and seen["cfg"].train.out_dir == out and seen["cfg"].train.iters == 7


def test_resume_with_a_checkpoint_path(tmp_path, monkeypatch):
    import clipteacher.train.engine as engine
    from clipteacher.cli.train import main

    seen = {}
    monkeypatch.setattr(engine, "train", lambda cfg, resume, verbose: seen.update(resume=resume) or {})
    ckpt = tmp_path / "a=b.pt"  # an existing file whose name has '=' stays a checkpoint
    ckpt.write_bytes(b"")
    assert main(["--resume", str(ckpt), "train.iters=3"]) == 0 and seen["resume"] == str(ckpt)
