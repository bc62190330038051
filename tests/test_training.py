import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from PIL import Image

from helpers import make_dataset, tiny_config
from clipteacher.cli import train as run
from clipteacher.checkpoint import load_checkpoint
from clipteacher.train.engine import train

ROOT = Path(__file__).resolve().parents[1]


def test_resume_after_interruption_matches_uninterrupted_run(tiny_data, tmp_path):
    train(tiny_config(tiny_data, tmp_path / "a"), verbose=False)
    train(tiny_config(tiny_data, tmp_path / "b", train={"stop_at": 2}), verbose=False)
    assert load_checkpoint(tmp_path / "b" / "last.pt")["step"] == 2
    with (tmp_path / "b" / "metrics.jsonl").open("a") as f:  # logged after the checkpoint, then killed
        f.write(json.dumps({"step": 3, "loss": -1.0}) + "\n" + '{"step": 4, "lo')
    train(tiny_config(tiny_data, tmp_path / "b"), resume="auto", verbose=False)
    records = [json.loads(x) for x in (tmp_path / "b" / "metrics.jsonl").read_text().splitlines()]
    steps = [r["step"] for r in records if "loss" in r]
    assert steps == sorted(set(steps)) and steps[-1] == 4 and all(r["loss"] != -1.0 for r in records if "loss" in r)
    a = load_checkpoint(tmp_path / "a" / "last.pt")
    b = load_checkpoint(tmp_path / "b" / "last.pt")
    assert a["step"] == b["step"] == 4
    for key, value in a["model"].items():
        assert torch.equal(value, b["model"][key]), key
    # and training actually changed the weights
    fresh = tiny_config(tiny_data, tmp_path / "c", train={"iters": 1, "stop_at": 0})
    train(fresh, verbose=False)
    c = load_checkpoint(tmp_path / "c" / "last.pt")["model"]
    assert any(not torch.equal(v, c[k]) for k, v in a["model"].items() if v.is_floating_point())


def test_outputs_written_next_to_checkpoint(tiny_data, tmp_path):
    metrics = train(tiny_config(tiny_data, tmp_path / "o", train={"iters": 2}), verbose=False)
    out = tmp_path / "o"
    assert {"pAcc", "mIoU(S)", "mIoU(U)", "hIoU"} <= set(metrics)
    saved = yaml.safe_load((out / "config.yaml").read_text())
    assert saved["train"]["iters"] == 2
    lines = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    assert any("loss" in x for x in lines) and any("val/hIoU" in x for x in lines)
    ckpt = load_checkpoint(out / "last.pt")
    assert ckpt["vocabulary"] == ["sky", "grass", "cow"] and ckpt["config"]["train"]["iters"] == 2
    assert not list(out.glob("*.tmp"))


@pytest.mark.parametrize("switch", ["loss.glm_weight=0", "loss.ce_weight=0", "loss.gen_weight=0", "loss.focal_weight=0"])
def test_each_loss_can_be_switched_off(tiny_data, tmp_path, switch):
    key, _ = switch.split("=")
    section, field = key.split(".")
    cfg = tiny_config(tiny_data, tmp_path / "s", train={"iters": 1}, **{section: {field: 0.0}})
    train(cfg, verbose=False)
    rec = [json.loads(x) for x in (tmp_path / "s" / "metrics.jsonl").read_text().splitlines() if '"loss"' in x][0]
    name = {"glm_weight": "glm", "ce_weight": "ce", "gen_weight": "gen", "focal_weight": "focal"}[field]
    assert name not in rec and "loss" in rec


def test_torchrun_two_processes(tiny_data, tmp_path):
    cfg_path = tmp_path / "tiny.yaml"
    cfg = tiny_config(tiny_data, tmp_path / "ddp", train={"iters": 2, "ckpt_every": 2, "batch_size": 1},
                      teacher={"mode": "cached"})  # rank 0 builds the cache, rank 1 waits and reuses it
    cfg_path.write_text(yaml.safe_dump(cfg.to_dict()))
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
                           str(ROOT / "training" / "run.py"), "--config", str(cfg_path), "--quiet"],
                          capture_output=True, text=True, env=env, timeout=300, cwd=ROOT)
    assert proc.returncode == 0, proc.stderr[-2000:]
    ckpt = load_checkpoint(tmp_path / "ddp" / "last.pt")
    assert ckpt["step"] == 2
    # CLS tokens were all-gathered: 2 steps x 1 image x 2 processes entered the bank
    assert int(ckpt["model"]["glm.bank.count"]) == 4


def run_cli(argv, capsys):
    code = run.main(argv)
    err = capsys.readouterr().err.strip()
    return code, err


def write_cfg(tmp_path, cfg):
    path = tmp_path / "cfg.yaml"
    path.write_text(yaml.safe_dump(cfg.to_dict()))
    return str(path)


def test_bad_input_missing_dataset(tmp_path, capsys):
    path = write_cfg(tmp_path, tiny_config(tmp_path / "nowhere", tmp_path / "out"))
    code, err = run_cli(["--config", path, "--quiet"], capsys)
    assert code == 2 and "nowhere" in err and len(err.splitlines()) == 1
    assert not (tmp_path / "out" / "last.pt").exists()


def test_bad_input_unknown_config_key(tiny_data, tmp_path, capsys):
    path = write_cfg(tmp_path, tiny_config(tiny_data, tmp_path / "out"))
    code, err = run_cli(["--config", path, "train.itres=3"], capsys)
    assert code == 2 and "train.itres" in err and len(err.splitlines()) == 1


def broken_copy(tmp_path):
    return make_dataset(tmp_path / "broken", n_train=3, n_val=1)


def test_bad_input_split_names_missing_image(tmp_path, capsys):
    root = broken_copy(tmp_path)
    with open(root / "splits" / "train.txt", "a") as f:
        f.write("ghost\n")
    code, err = run_cli(["--config", write_cfg(tmp_path, tiny_config(root, tmp_path / "out")), "--quiet"], capsys)
    assert code == 2 and "ghost" in err and len(err.splitlines()) == 1


def test_bad_input_unreadable_image(tmp_path, capsys):
    root = broken_copy(tmp_path)
    image = next((root / "images").glob("t1.*"))
    image.write_bytes(b"not an image")
    code, err = run_cli(["--config", write_cfg(tmp_path, tiny_config(root, tmp_path / "out")), "--quiet"], capsys)
    assert code == 2 and image.name in err and len(err.splitlines()) == 1


def test_bad_input_label_out_of_range(tmp_path, capsys):
    root = broken_copy(tmp_path)
    label_path = root / "labels" / "t2.png"
    lab = Image.open(label_path)
    arr = np.array(lab)
    arr[0, 0] = 17
    out = Image.fromarray(arr, mode="P")
    out.putpalette(lab.getpalette())
    out.save(label_path)
    code, err = run_cli(["--config", write_cfg(tmp_path, tiny_config(root, tmp_path / "out")), "--quiet"], capsys)
    assert code == 2 and "t2.png" in err and "17" in err and len(err.splitlines()) == 1


def test_bad_input_checkpoint_from_another_model(tiny_data, tmp_path, capsys):
    train(tiny_config(tiny_data, tmp_path / "m", train={"iters": 1}), verbose=False)
    other = tiny_config(tiny_data, tmp_path / "m", student={"head_dim": 24})
    code, err = run_cli(["--config", write_cfg(tmp_path, other), "--resume", "--quiet"], capsys)
    assert code == 2 and "student.head_dim" in err and len(err.splitlines()) == 1


def test_evaluate_cli_on_unseen_folder(tiny_data, tmp_path, capsys):
    train(tiny_config(tiny_data, tmp_path / "e", train={"iters": 1}), verbose=False)
    other = make_dataset(tmp_path / "held_out", n_train=1, n_val=3, seed=7)
    from clipteacher.cli import evaluate

    out = tmp_path / "eval.json"
    code = evaluate.main(["--checkpoint", str(tmp_path / "e" / "last.pt"), "--data", str(other), "--split", "val",
                          "--out", str(out)])
    assert code == 0
    result = json.loads(out.read_text())
    assert {"pAcc", "mIoU(S)", "mIoU(U)", "hIoU", "per_class"} <= set(result)
    assert list(result["per_class"]) == ["sky", "cat", "grass", "cow"]
    s, u = result["mIoU(S)"], result["mIoU(U)"]
    assert abs(result["hIoU"] - (0 if s + u == 0 else 2 * s * u / (s + u))) < 1e-9
    code = evaluate.main(["--checkpoint", str(other / "dataset.json"), "--data", str(other)])
    assert code == 2 and "not a clipteacher checkpoint" in capsys.readouterr().err

    # with distractor names: they can only take pixels from the dataset's classes
    code = evaluate.main(["--checkpoint", str(tmp_path / "e" / "last.pt"), "--data", str(other), "--split", "val",
                          "--out", str(out), "--distractors", "40"])
    crowded = json.loads(out.read_text())
    assert code == 0 and len(crowded["distractors"]) == 40 and not {"sky", "cat", "grass", "cow"} & set(crowded["distractors"])
    assert 0 <= crowded["distractor_share"] <= 100 and crowded["pixels"] == result["pixels"]
    assert abs(sum(crowded["distractors"].values()) - crowded["distractor_share"]) < 1e-6  # per name, summed
    assert crowded["pAcc"] <= result["pAcc"] + 1e-9


def test_dense_distillation_term_is_logged_when_switched_on(tiny_data, tmp_path):
    train(tiny_config(tiny_data, tmp_path / "d", train={"iters": 1}, loss={"dense_weight": 1.0}), verbose=False)
    rec = [json.loads(x) for x in (tmp_path / "d" / "metrics.jsonl").read_text().splitlines() if '"loss"' in x][0]
    assert rec["dense"] > 0


def test_stray_rank_outside_torchrun_still_counts_as_the_main_process(tiny_data, tmp_path, monkeypatch):
    # A shell that exported RANK (e.g. left over from a cluster job) runs one process: it is the main one and
    # must report its input checks. The old code read RANK alone and went quiet.
    from clipteacher.train import engine

    seen = {}

    def stop(cfg, resume, verbose, main):
        seen["main"] = main
        raise RuntimeError("stop after the input check")

    monkeypatch.setenv("RANK", "3")
    monkeypatch.delenv("WORLD_SIZE", raising=False)
    monkeypatch.setattr(engine, "check_inputs", stop)
    with pytest.raises(RuntimeError, match="stop after"):
        engine.train(tiny_config(tiny_data, tmp_path / "r"), verbose=True)
    assert seen["main"] is True
    monkeypatch.setenv("WORLD_SIZE", "4")  # under torchrun the announced rank decides
    with pytest.raises(RuntimeError, match="stop after"):
        engine.train(tiny_config(tiny_data, tmp_path / "r"), verbose=True)
    assert seen["main"] is False
