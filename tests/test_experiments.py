"""The shared benchmark runner (training/experiments/runner.py) end to end on a tiny synthetic dataset."""
import json

import numpy as np
import pytest
import torch
import yaml
from PIL import Image

from helpers import make_dataset, synthetic_sample, tiny_config
from clipteacher.cli import evaluate as evaluate_cli
from clipteacher.checkpoint import inference_copy, load_checkpoint, save_checkpoint
from clipteacher.train.gamma import choose_gamma
from training.experiments import runner


def test_runner_rows_calibration_on_train_slice_docs_and_fp16_checkpoint(tmp_path, monkeypatch, capsys):
    data = make_dataset(tmp_path / "data", n_train=10, n_val=2)
    pool = tmp_path / "pool"
    (pool / "images").mkdir(parents=True)
    Image.fromarray(synthetic_sample(np.random.default_rng(0))[0]).save(pool / "images" / "a.png")
    config = tmp_path / "tiny.yaml"
    config.write_text(yaml.safe_dump(tiny_config(data, tmp_path / "unused").to_dict()))
    bench = runner.Benchmark(name="tiny", title="Tiny", config=str(config), data=str(data), holdout=["cow"],
                             figure_ids=["v0"], heldout_fraction=0.3, default_rows=["teacher", "full", "full_pool"])
    docs = tmp_path / "docs"
    docs.mkdir()
    (docs / "RESULTS.md").write_text("# Results\n\nhand-written reading\n")
    swept = []
    real_confusions = runner.gamma_confusions
    monkeypatch.setattr(runner, "gamma_confusions",
                        lambda seg, folder, *a: swept.append(list(folder.ids)) or real_confusions(seg, folder, *a))
    argv = ["--iters", "2", "--out", str(tmp_path / "out"), "--docs", str(docs), "--assets", str(tmp_path / "assets"),
            "--pool", str(pool)]
    runner.main(bench, argv)
    out = tmp_path / "out"
    # gamma was chosen on train images the calibration model never trained on, never on val
    calib_ids = swept[0]
    assert calib_ids and all(i.startswith("t") for i in calib_ids)
    full = json.loads((out / "full_result.json").read_text())
    assert full["calibration_images"] == len(calib_ids) and full["gamma_rule"] == "one_se"
    cal_cfg = yaml.safe_load((out / "full_calibration" / "config.yaml").read_text())
    assert cal_cfg["data"]["heldout_fraction"] == 0.3 and cal_cfg["data"]["holdout"] == ["cow"]
    pool_cfg = yaml.safe_load((out / "full_pool" / "config.yaml").read_text())
    assert pool_cfg["data"]["extra"][0] == {"kind": "images", "root": str(pool), "split": "train", "val_split": "val",
                                            "weight": 0.5, "exclude_probe": True}
    text = (docs / "RESULTS.md").read_text()
    assert "hand-written reading" in text and "| full_pool |" in text and "| teacher |" in text
    runner.main(bench, argv[:-2] + ["--report-only"])  # the section is replaced, not appended twice
    assert (docs / "RESULTS.md").read_text().count("## Tiny") == 1
    # a row whose trainings finished in other processes is scored, not retrained, and its time is not claimed
    (out / "full_result.json").unlink()
    runner.main(bench, argv + ["--rows", "full", "--resume"])
    again = json.loads((out / "full_result.json").read_text())
    assert again["calibration_seconds"] is None and again["train_seconds"] is None
    assert again["gamma"] == full["gamma"] and again["iters"] == 2
    row = next(x for x in (docs / "RESULTS.md").read_text().splitlines() if x.startswith("| full |"))
    assert row.endswith("| – |")
    # --rescore chooses gamma again from the calibration model (a result from an older rule is corrected)
    stale = dict(again, gamma=99.0, calibration={})
    (out / "full_result.json").write_text(json.dumps(stale))
    runner.main(bench, argv + ["--rows", "full", "--rescore"])
    rescored = json.loads((out / "full_result.json").read_text())
    assert rescored["gamma"] == full["gamma"] and rescored["calibration"]["best"] == full["calibration"]["best"]
    save_checkpoint(inference_copy(load_checkpoint(out / "full" / "last.pt"), gamma=full["gamma"] + 2.5), tmp_path / "g.pt")
    regammad = load_checkpoint(tmp_path / "g.pt")  # the stored config agrees with the gamma the copy carries
    assert regammad["gamma"] == regammad["config"]["train"]["gamma"] == full["gamma"] + 2.5
    with pytest.raises(SystemExit, match="no result"):
        runner.main(bench, argv + ["--rows", "no_glm", "--rescore"])
    # the fp16 benchmark checkpoint is small and re-scorable with the evaluate command
    small = tmp_path / "assets" / "benchmarks" / "tiny_zeroshot"
    ckpt = load_checkpoint(small)
    assert all(v.dtype == torch.float16 for v in ckpt["model"].values() if v.is_floating_point())
    assert "optimizer" not in ckpt and ckpt["gamma"] == full["gamma"]
    capsys.readouterr()
    assert evaluate_cli.main(["--checkpoint", str(small), "--data", str(data), "--out", str(tmp_path / "e.json")]) == 0
    assert evaluate_cli.main(["--checkpoint", str(out / "full" / "last.pt"), "--data", str(data),
                              "--out", str(tmp_path / "f.json")]) == 0
    half, single = (json.loads((tmp_path / n).read_text()) for n in ("e.json", "f.json"))
    assert half["gamma"] == single["gamma"]
    assert abs(half["pAcc"] - single["pAcc"]) < 1.0  # fp16 weights: the same model up to rounding
    # other pseudo-unseen classes: their own calibration model, recorded and named in the row's table line
    (out / "full_result.json").unlink()
    runner.main(bench, argv + ["--rows", "full", "--resume", "--holdout", "grass"])
    other = json.loads((out / "full_result.json").read_text())
    assert other["holdout"] == ["grass"] and other["calibration_seconds"] is not None
    cal_cfg = yaml.safe_load((out / "full_calibration_grass" / "config.yaml").read_text())
    assert cal_cfg["data"]["holdout"] == ["grass"]
    assert "`--holdout grass`" in next(x for x in (docs / "RESULTS.md").read_text().splitlines() if x.startswith("| full |"))
    with pytest.raises(SystemExit, match="cat not seen classes"):  # unseen, not a seen class
        runner.main(bench, argv + ["--rows", "no_glm", "--holdout", "cat"])


def _images(per_gamma: list[np.ndarray], n: int) -> np.ndarray:
    """N x G x C x C: `n` copies of one image's G x C x C counts."""
    return np.repeat(np.stack(per_gamma)[None], n, axis=0)


def test_choose_gamma_takes_a_clear_peak_away_from_zero():
    classes, unseen, gammas = ["a", "b"], ["b"], [-1.0, 0.0, 1.0]
    right = np.array([[50, 0], [0, 50]])  # every pixel right
    wrong = np.array([[50, 0], [50, 0]])  # the pseudo-unseen class never predicted: hIoU 0
    per_image = _images([wrong, wrong, right], 30)
    for seed in range(5):  # any bootstrap draw: every image is better at gamma 1
        gamma, info = choose_gamma(per_image, gammas, classes, unseen, resamples=50, seed=seed)
        assert gamma == 1.0 and info["best"] == 1.0 and info["1.0"]["hIoU"] == 100.0


def test_choose_gamma_prefers_zero_when_the_best_is_within_noise():
    classes, unseen, gammas = ["a", "b"], ["b"], [-1.0, 0.0, 1.0]
    right = np.array([[50, 0], [0, 50]])
    half = np.array([[50, 0], [25, 25]])  # half the pseudo-unseen pixels right
    wrong = np.array([[50, 0], [50, 0]])
    # Images disagree: 21 are right at gamma -1 and wrong at 0, 20 the reverse. gamma -1 wins on the whole
    # slice by one image, far less than what resampling the images moves.
    per_image = np.concatenate([_images([right, wrong, half], 21), _images([wrong, right, half], 20)])
    for seed in range(5):
        gamma, info = choose_gamma(per_image, gammas, classes, unseen, resamples=200, seed=seed)
        assert info["best"] == -1.0 and info["-1.0"]["hIoU"] > info["0.0"]["hIoU"]  # the argmax would take -1
        assert info["se"] > info["-1.0"]["hIoU"] - info["0.0"]["hIoU"]
        assert gamma == 0.0


def test_default_model_ships_fp16_card_results_and_scores_every_previous_model(tmp_path, monkeypatch, capsys):
    from clipteacher.train.engine import train
    from training.experiments import default_model

    data = make_dataset(tmp_path / "data", n_train=4, n_val=2)
    cfg = tiny_config(data, tmp_path / "run")
    cfg.train.iters = 2
    train(cfg, verbose=False)
    pool = tmp_path / "pool"
    (pool / "images").mkdir(parents=True)
    Image.fromarray(synthetic_sample(np.random.default_rng(1))[0]).save(pool / "images" / default_model.UNSEEN_NAMES[0][0])
    monkeypatch.setattr(default_model, "DATASETS", {"tiny": str(data)})
    monkeypatch.setattr(default_model, "POOL", pool)
    older = [tmp_path / "a.pt", tmp_path / "b.pt"]
    for p in older:
        p.write_bytes((tmp_path / "run" / "last.pt").read_bytes())
    assets, docs = tmp_path / "assets", tmp_path / "docs"
    default_model.main(["--checkpoint", str(tmp_path / "run" / "last.pt"), "--previous", str(older[0]),
                        "--previous", str(older[1]), "--assets", str(assets), "--docs", str(docs), "--gamma", "0.5"])
    ckpt = load_checkpoint(assets / "default")  # a model folder: safetensors weights, config.json, card
    assert ckpt["gamma"] == 0.5 == ckpt["config"]["train"]["gamma"] and "optimizer" not in ckpt
    assert all(v.dtype == torch.float16 for v in ckpt["model"].values() if v.is_floating_point())
    assert "assets/default" in (assets / "default" / "README.md").read_text()
    results = (docs / "RESULTS.md").read_text()
    assert all(f"| previous (`{p}`) | tiny |" in results for p in older)  # each replaced model scored
    assert (docs / "default_unseen_names.png").is_file() and default_model.UNSEEN_NAMES[0][0] in results


def test_default_model_sets_the_vocabulary_mix_it_was_told(tmp_path, monkeypatch, capsys):
    from clipteacher.train.engine import train
    from training.experiments import default_model

    data = make_dataset(tmp_path / "data", n_train=4, n_val=2)
    monkeypatch.setattr(default_model, "DATASETS", {"tiny": str(data)})
    monkeypatch.setattr(default_model, "POOL", tmp_path / "no_pool")
    plain = tiny_config(data, tmp_path / "plain", train={"iters": 1})
    train(plain, verbose=False)
    args = ["--assets", str(tmp_path / "assets"), "--docs", str(tmp_path / "docs"), "--vocab-mix", "0.25"]
    with pytest.raises(SystemExit, match="no vocabulary head"):
        default_model.main(["--checkpoint", str(tmp_path / "plain" / "last.pt")] + args)
    head = tiny_config(data, tmp_path / "head", train={"iters": 1}, student={"vocab_topk": 4})
    train(head, verbose=False)
    default_model.main(["--checkpoint", str(tmp_path / "head" / "last.pt")] + args)
    shipped = load_checkpoint(tmp_path / "assets" / "default")["model"]["student.vocab_mix"]
    assert float(shipped) == 0.25 and float(load_checkpoint(tmp_path / "head" / "last.pt")["model"]["student.vocab_mix"]) != 0.25
    assert "--vocab-mix 0.25" in (tmp_path / "docs" / "RESULTS.md").read_text()


def test_default_model_writes_the_ship_time_checkpoint_with_the_branch_and_nothing_else(tmp_path, monkeypatch):
    """--write-checkpoint: the model as it would ship (branch added, then interpolated, mixture set), for probe and
    val sweeps; no model folder, no docs."""
    from clipteacher.train.engine import train
    from training.experiments import default_model

    data = make_dataset(tmp_path / "data", n_train=4, n_val=2)
    monkeypatch.setattr(default_model, "DATASETS", {"tiny": str(data)})
    head = tiny_config(data, tmp_path / "head", train={"iters": 1}, student={"vocab_topk": 4, "pretrained": True})
    train(head, verbose=False)
    out = tmp_path / "variant.pt"
    default_model.main(["--checkpoint", str(tmp_path / "head" / "last.pt"), "--vocab-branch", "--vocab-mix", "0.5",
                        "--pretrained-weight", "0.5", "--assets", str(tmp_path / "assets"), "--docs",
                        str(tmp_path / "docs"), "--write-checkpoint", str(out)])
    assert not (tmp_path / "assets").exists() and not (tmp_path / "docs").exists()
    ckpt, trained = load_checkpoint(out), load_checkpoint(tmp_path / "head" / "last.pt")
    assert ckpt["config"]["student"]["vocab_branch"] and float(ckpt["model"]["student.vocab_mix"]) == 0.5
    assert any(k.startswith("student.vocab.branch.") for k in ckpt["model"])
    assert torch.equal(ckpt["model"]["student.head.embed.weight"].float(),
                       trained["model"]["student.head.embed.weight"].half().float())  # the head as trained
    from clipteacher.predictor import Segmenter

    assert Segmenter.from_checkpoint(out).student.vocab.branch is not None  # loads strictly

    plain = tiny_config(data, tmp_path / "plain", train={"iters": 1})
    train(plain, verbose=False)
    with pytest.raises(SystemExit, match="--vocab-branch: .*vocabulary head"):
        default_model.main(["--checkpoint", str(tmp_path / "plain" / "last.pt"), "--vocab-branch",
                            "--write-checkpoint", str(out)])
