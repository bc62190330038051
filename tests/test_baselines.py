"""The seed baselines: ZegCLIP, TagCLIP (clipteacher.models.zegclip, clipteacher.train.zegclip) and MaskCLIP+
(clipteacher.train.maskclip), on tiny random open_clip models."""
from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from helpers import TINY_CLIP, make_official_layout, synthetic_sample, tiny_config
from clipteacher.config import ConfigError, ZegCLIPConfig, load_config
from clipteacher.models.zegclip import ZegCLIP, block_forward, combine, clip_visual
from clipteacher.train.maskclip import maskclip_loss, teacher_pseudo_labels
from clipteacher.train.zegclip import ZegCLIPLearner, presence_targets

ROOT = Path(__file__).resolve().parents[1]
SMALL = {"decoder_dim": 32, "decoder_heads": 4, "prompt_tokens": 3}
TRAINED = ("encoder.prompts", "queries.", "decoder.", "presence.")  # all that ZegCLIP/TagCLIP may train


def tiny_zegclip(trusty: bool = False, cls_weight: float = 0.0) -> ZegCLIP:
    import open_clip

    torch.manual_seed(0)
    cfg = ZegCLIPConfig(decoder_dim=32, decoder_heads=4, prompt_tokens=3, trusty=trusty, cls_weight=cls_weight)
    return ZegCLIP(cfg, open_clip.CLIP(**TINY_CLIP).visual, TINY_CLIP["embed_dim"])


def zegclip_config(tiny_data, out, trusty=False, **more):
    cfg = tiny_config(tiny_data, out, zegclip={**SMALL, "trusty": trusty, **more})
    cfg.method = "zegclip"
    return cfg


# --------------------------------------------------------------------- the model


@pytest.mark.parametrize("trusty", [False, True])
def test_forward_shapes_for_any_image_size_and_vocabulary(trusty):
    model = tiny_zegclip(trusty, cls_weight=1.0).eval()
    text = F.normalize(torch.randn(5, 32), dim=-1)
    for h, w in ((48, 64), (40, 40)):
        out = model(torch.rand(2, 3, h, w), text)
        assert len(out["masks"]) == 3 and all(m.shape == (2, 5, h // 8, w // 8) for m in out["masks"])
        assert (out["trust"] is not None) == trusty and (not trusty or out["trust"].shape == (2, 1, h // 8, w // 8))
        assert out["presence"].shape == (2, 5)


def test_written_out_attention_block_matches_open_clip():
    import open_clip

    visual = open_clip.CLIP(**TINY_CLIP).visual.eval()
    x = torch.randn(2, 9, 64)
    for block in visual.transformer.resblocks:
        assert torch.allclose(block_forward(block, x), block(x), atol=1e-5)


def test_no_prompts_reproduce_the_plain_clip_image_embedding():
    """With zero prompt tokens the encoder is CLIP itself: its g is CLIP's own image embedding."""
    import open_clip

    torch.manual_seed(0)
    clip = open_clip.CLIP(**TINY_CLIP).eval()
    model = ZegCLIP(ZegCLIPConfig(decoder_dim=32, decoder_heads=4, prompt_tokens=0), clip.visual, 32).eval()
    images = torch.rand(2, 3, 32, 32)
    g, _ = model.encode(images)
    from open_clip.constants import OPENAI_DATASET_MEAN, OPENAI_DATASET_STD

    mean, std = torch.tensor(OPENAI_DATASET_MEAN).view(1, 3, 1, 1), torch.tensor(OPENAI_DATASET_STD).view(1, 3, 1, 1)
    assert torch.allclose(g, F.normalize(clip.encode_image((images - mean) / std), dim=-1), atol=1e-5)


@pytest.mark.parametrize("trusty", [False, True])
def test_gradients_reach_prompts_and_decoder_only(trusty):
    model = tiny_zegclip(trusty, cls_weight=1.0).train()
    out = model(torch.rand(2, 3, 48, 48), F.normalize(torch.randn(4, 32), dim=-1))
    loss = sum(m.sum() for m in out["masks"]) + out["presence"].sum() + (out["trust"].sum() if trusty else 0)
    loss.backward()
    for name, p in model.named_parameters():
        if name.startswith("encoder.visual."):
            assert not p.requires_grad and p.grad is None, name
        else:
            assert name.startswith(TRAINED), name
            assert p.grad is not None, name
    assert model.encoder.prompts.grad.abs().sum() > 0  # through the frozen CLIP
    if trusty:
        assert model.queries.token.grad.abs().sum() > 0


def test_combine_is_tagclips_trusty_weighting_in_log_space():
    m = torch.tensor([0.3, -1.2, 2.0]).view(1, 3, 1, 1)
    a = torch.tensor([0.8]).view(1, 1, 1, 1)
    unseen = torch.tensor([False, True, False])
    got = combine(m, a, unseen, torch.tensor([0.0, 1.5, 0.0]))[0, :, 0, 0]
    sig = lambda v: 1 / (1 + math.exp(-v))  # noqa: E731
    want = [math.log(sig(0.8) * sig(0.3)), math.log((1 - sig(0.8)) * sig(-1.2)) + 1.5, math.log(sig(0.8) * sig(2.0))]
    assert torch.allclose(got, torch.tensor(want), atol=1e-5)
    # without a trusty map the scores are the mask logits plus the bias (ZegCLIP)
    assert torch.allclose(combine(m, None, unseen, torch.tensor([0.0, 1.5, 0.0]))[0, :, 0, 0], torch.tensor([0.3, 0.3, 2.0]))


# --------------------------------------------------------------------- the losses


def test_presence_targets_by_hand():
    labels = torch.tensor([[[0, 255], [2, 2]], [[255, 255], [1, 255]]])
    assert torch.equal(presence_targets(labels, 3, 255), torch.tensor([[1.0, 0, 1], [0, 1, 0]]))


def test_trusty_loss_is_dice_against_seen_vs_ignored_with_padding_excluded(tiny_data, tmp_path):
    cfg = zegclip_config(tiny_data, tmp_path, trusty=True)
    cfg.loss.focal_weight = cfg.loss.dice_weight = 0.0
    model = tiny_zegclip(True)
    learner = ZegCLIPLearner(cfg, model, F.normalize(torch.randn(3, 32), dim=-1))
    fixed = torch.tensor([[2.0, -1.0], [0.5, 0.0]])  # trusty logits at 2 x 2, the label's size

    def stand_in(images, text):
        return {"masks": [torch.zeros(1, 3, 2, 2)], "trust": fixed.view(1, 1, 2, 2), "presence": None}

    learner.student.forward = stand_in
    labels = torch.tensor([[[0, 255], [255, 1]]])  # G_A = 1 0 / 0 1
    valid = torch.tensor([[[True, True], [False, True]]])  # the third pixel is padding
    loss = learner(torch.zeros(1, 3, 2, 2), labels, valid)["trusty"]
    p = [1 / (1 + math.exp(-v)) for v in (2.0, -1.0, 0.0)]  # the three valid pixels
    y = [1, 0, 1]
    dice = 1 - (2 * (p[0] + p[2]) + 1) / (sum(p) + sum(y) + 1)
    assert loss.item() == pytest.approx(10.0 * dice, rel=1e-5)


def test_every_decoder_layer_is_supervised(tiny_data, tmp_path):
    cfg = zegclip_config(tiny_data, tmp_path)
    learner = ZegCLIPLearner(cfg, tiny_zegclip(), F.normalize(torch.randn(3, 32), dim=-1))
    layer = torch.randn(1, 3, 2, 2)
    labels, valid = torch.tensor([[[0, 1], [2, 255]]]), torch.ones(1, 2, 2, dtype=torch.bool)
    learner.student.forward = lambda i, t: {"masks": [layer], "trust": None, "presence": None}
    one = learner(torch.zeros(1, 3, 2, 2), labels, valid)
    learner.student.forward = lambda i, t: {"masks": [layer, layer, layer], "trust": None, "presence": None}
    three = learner(torch.zeros(1, 3, 2, 2), labels, valid)
    assert three["focal"].item() == pytest.approx(3 * one["focal"].item())
    assert three["dice"].item() == pytest.approx(3 * one["dice"].item())


def test_teacher_pseudo_labels_by_hand():
    text = torch.eye(3)  # three names along the axes
    dense = torch.zeros(1, 3, 1, 3)
    dense[0, :, 0, 0] = torch.tensor([1.0, 0.0, 0.0])
    dense[0, :, 0, 1] = torch.tensor([0.0, 0.6, 0.8])
    # cell 2 is padding (a zero token)
    assert teacher_pseudo_labels(dense, text, temperature=1.0, denoise=0.0).tolist() == [[[0, 2, -1]]]
    # softmax confidences: cell 0 gives name 0 e / (e + 2); cell 1 gives name 2 e^.8 / (1 + e^.6 + e^.8)
    name0 = math.e / (math.e + 2)
    name2 = math.exp(0.8) / (1 + math.exp(0.6) + math.exp(0.8))
    assert 0.5 < name0 and 0.4 < name2 < 0.45
    assert teacher_pseudo_labels(dense, text, 1.0, denoise=0.4).tolist() == [[[0, 2, -1]]]
    # at 0.45 name 2 is below the threshold everywhere and is dropped: name 0 takes cell 1 too
    assert teacher_pseudo_labels(dense, text, 1.0, denoise=0.45).tolist() == [[[0, 0, -1]]]
    # no name passes: the image keeps them all
    assert teacher_pseudo_labels(dense, text, 1.0, denoise=0.99).tolist() == [[[0, 2, -1]]]


def test_maskclip_loss_by_hand():
    logits = torch.tensor([[2.0, 0.0, -1.0], [0.5, 1.0, 0.0]]).T.reshape(1, 3, 1, 2)  # cell 0, cell 1
    labels = torch.tensor([[[0, 255]]])  # cell 0 labelled seen class 0; cell 1 unlabelled
    pseudo = torch.tensor([[[2, 1]]])  # the teacher's names: cell 1 -> name 1 (cell 0 keeps its label)
    valid = torch.ones(1, 1, 2, dtype=torch.bool)
    got = maskclip_loss(logits, labels, pseudo, valid)
    lse0 = math.log(math.exp(2.0) + math.exp(0.0) + math.exp(-1.0))
    lse1 = math.log(math.exp(0.5) + math.exp(1.0) + math.exp(0.0))
    assert got.item() == pytest.approx(((lse0 - 2.0) + (lse1 - 1.0)) / 2, rel=1e-5)
    # padding and cells without a pseudo label do not count
    got = maskclip_loss(logits, labels, torch.tensor([[[2, -1]]]), valid)
    assert got.item() == pytest.approx(lse0 - 2.0, rel=1e-5)


# --------------------------------------------------------------------- training


@pytest.mark.parametrize("trusty", [False, True])
def test_zegclip_trains_leaves_clip_untouched_and_resumes(tiny_data, tmp_path, trusty):
    from clipteacher.checkpoint import load_checkpoint
    from clipteacher.train.engine import train

    cfg = zegclip_config(tiny_data, tmp_path / "run", trusty=trusty, cls_weight=1.0 if trusty else 0.0)
    cfg.train.stop_at = 2
    train(cfg, verbose=False)
    first = load_checkpoint(tmp_path / "run" / "last.pt")
    cfg.train.stop_at = 0
    train(cfg, resume="auto", verbose=False)
    last = load_checkpoint(tmp_path / "run" / "last.pt")
    assert first["step"] == 2 and last["step"] == cfg.train.iters
    frozen = [k for k in last["model"] if k.startswith("student.encoder.visual.")]
    assert frozen and all(torch.equal(first["model"][k], last["model"][k]) for k in frozen)
    assert not torch.equal(first["model"]["student.encoder.prompts"], last["model"]["student.encoder.prompts"])
    import open_clip

    torch.manual_seed(cfg.train.seed)  # the run's teacher, rebuilt: ZegCLIP's tower is that CLIP's, unchanged
    clip = open_clip.CLIP(**TINY_CLIP)
    assert torch.equal(last["model"]["student.encoder.visual.conv1.weight"], clip.visual.conv1.weight.detach())
    lines = (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()
    assert ("trusty" in lines[-2]) == trusty and '"focal"' in lines[-2]


def test_maskclip_plus_switches_to_self_training(tiny_data, tmp_path, monkeypatch):
    """Before maskclip.self_train_after x iters the teacher labels the unlabelled pixels, after it the student."""
    from clipteacher.train import distill
    from clipteacher.train.engine import train

    calls = []
    real = distill.teacher_pseudo_labels
    monkeypatch.setattr(distill, "teacher_pseudo_labels", lambda *a, **k: calls.append(1) or real(*a, **k))
    cfg = tiny_config(tiny_data, tmp_path / "run", maskclip={"self_train_after": 0.5},
                      loss={"glm_weight": 0, "ce_weight": 0, "gen_weight": 0, "focal_weight": 0, "dice_weight": 0})
    cfg.method = "maskclip_plus"
    train(cfg, verbose=False)
    assert len(calls) == 2  # steps 0 and 1 of 4
    log = (tmp_path / "run" / "metrics.jsonl").read_text()
    assert '"maskclip"' in log and '"glm"' not in log


def test_maskclip_plus_names_include_unseen_only_when_transductive(tiny_data, tmp_path):
    from clipteacher.train.engine import build_run, check_inputs

    for names, expected in (("dataset", 4), ("seen", 3)):
        cfg = tiny_config(tiny_data, tmp_path / names, maskclip={"names": names})
        cfg.method = "maskclip_plus"
        run = build_run(cfg, *check_inputs(cfg, None, False, True)[:2], verbose=False)
        assert run.core.text_names.shape[0] == expected
        assert torch.equal(run.core.text_names[:3], run.core.text_seen)


def test_zegclip_needs_a_clip_teacher_in_one_line():
    with pytest.raises(ConfigError) as err:
        load_config(None, ["method=zegclip", "teacher.kind=conse"])
    assert "teacher.kind=clip" in str(err.value) and "\n" not in str(err.value)


def test_resuming_a_student_run_as_zegclip_is_refused(tiny_data, tmp_path):
    from clipteacher.train.engine import train

    cfg = tiny_config(tiny_data, tmp_path / "run")
    cfg.train.stop_at = 2
    train(cfg, verbose=False)
    other = zegclip_config(tiny_data, tmp_path / "run")
    with pytest.raises(ValueError, match="method"):
        train(other, resume="auto", verbose=False)


# --------------------------------------------------------------------- export and runtime


@pytest.fixture(scope="module")
def zegclip_checkpoints(tiny_data, tmp_path_factory):
    from clipteacher.train.engine import train

    base = tmp_path_factory.mktemp("baselines")
    out = {}
    for name, trusty in (("zegclip", False), ("tagclip", True)):
        cfg = zegclip_config(tiny_data, base / name, trusty=trusty)
        train(cfg, verbose=False)
        out[name] = base / name / "last.pt"
    return out


@pytest.mark.parametrize("name", ["zegclip", "tagclip"])
def test_bundle_matches_pytorch_on_any_image_size(zegclip_checkpoints, tmp_path, name):
    from clipteacher.export.bundle import export_bundle
    from clipteacher.predictor import Segmenter
    from clipteacher.runtime import Bundle

    seg = Segmenter.from_checkpoint(zegclip_checkpoints[name])
    export_bundle(zegclip_checkpoints[name], tmp_path / "b", log=lambda *_: None)
    bundle = Bundle(tmp_path / "b", verbose=False)
    assert bundle.method == "zegclip" and bundle.trusty == (name == "tagclip") and bundle.feature_dim == 64
    names = ["sky", "cat", "grass", "cow"]  # the checkpoint's cached names ("cat" unseen: gamma and trusty weighting)
    rng = np.random.default_rng(1)
    for h, w in ((48, 64), (56, 40)):
        image, _ = synthetic_sample(rng, h, w)
        for gamma in (0.0, 2.0):
            want = seg.predict(image, names, gamma=gamma).numpy()
            got = bundle.segment(image, names, gamma=gamma)
            assert (got == want).mean() > 0.99
    # the teacher's own labels in the Compare view go through the plain cosine graph
    _, dense = bundle.teacher_tokens(image)
    labels, logits = bundle.classify(dense[None], bundle.embed_text(names), None, image.shape[:2], graph="cosine")
    assert labels.shape == image.shape[:2] and logits.shape[0] == 4
    assert bundle.meta["hubness"] is None


def test_int8_export_of_a_zegclip_checkpoint_is_refused_in_one_line(zegclip_checkpoints, tmp_path):
    from clipteacher.export.bundle import export_bundle

    with pytest.raises(ValueError, match="int8") as err:
        export_bundle(zegclip_checkpoints["zegclip"], tmp_path / "b", int8=True, log=lambda *_: None)
    assert "\n" not in str(err.value) and not (tmp_path / "b").exists()


def test_evaluate_cli_scores_a_zegclip_checkpoint(zegclip_checkpoints, tiny_data, tmp_path, capsys):
    from clipteacher.cli import evaluate

    out = tmp_path / "eval.json"
    assert evaluate.main(["--checkpoint", str(zegclip_checkpoints["tagclip"]), "--data", str(tiny_data),
                          "--out", str(out)]) == 0
    assert "hIoU" in out.read_text()


# --------------------------------------------------------------------- paper configs


BASELINE_CONFIGS = sorted(p.stem for p in (ROOT / "training" / "configs").glob("*.yaml")
                          if p.stem.startswith(("zegclip_", "tagclip_", "maskclip_plus_")))


def test_every_baseline_has_its_paper_configs():
    assert set(BASELINE_CONFIGS) == {f"zegclip_{k}" for k in ("voc", "context", "coco_stuff")} | {
        "tagclip_voc", "tagclip_coco_stuff"} | {f"maskclip_plus_{k}" for k in ("voc", "context", "coco_stuff")}


@pytest.mark.parametrize("name", BASELINE_CONFIGS)
def test_baseline_paper_config_dry_run(name, tmp_path):
    """Each baseline config runs end to end on the CPU (2 steps, checkpoint, resume, validation), reduced for CI
    to a tiny random CLIP and 64-pixel crops; the full-size run is `training/run.py --config ... --dry-run`."""
    from clipteacher.checkpoint import load_checkpoint
    from clipteacher.train.engine import dry_run

    kind = name.split("_", 2)[-1] if name.startswith("maskclip_plus") else name.split("_", 1)[1]
    root = make_official_layout(kind, tmp_path / kind)
    cfg = load_config(ROOT / "training" / "configs" / f"{name}.yaml", [
        f"data.root={root}", f"train.out_dir={tmp_path / 'run'}", "data.crop_size=64", "data.base_size=64",
        "data.eval_size=64", "data.num_workers=0", "teacher.input_size=64", "student.pretrained=false",
        "train.threads=1", "zegclip.decoder_dim=32", "zegclip.decoder_heads=4", "student.backbone=tf_efficientnet_lite0",
        "student.head_dim=16"])
    cfg.teacher.clip_config = TINY_CLIP
    metrics = dry_run(cfg, verbose=False)
    assert {"pAcc", "mIoU(S)", "mIoU(U)", "hIoU"} <= set(metrics)
    ckpt = load_checkpoint(tmp_path / "run" / "dry_run" / "last.pt")
    assert ckpt["step"] == 2 and ckpt["config"]["method"] == cfg.method


def test_triton_repository_of_a_tagclip_bundle_matches_its_graphs(zegclip_checkpoints, tmp_path):
    pytest.importorskip("tritonclient")
    from clipteacher.export.bundle import export_bundle
    from clipteacher.export.triton import check_repository, write_repository

    export_bundle(zegclip_checkpoints["tagclip"], tmp_path / "b", log=lambda *_: None)
    repo = write_repository(tmp_path / "b", tmp_path / "triton", instances="cpu")
    check_repository(repo)
    text = (repo / "clipteacher_classifier" / "config.pbtxt").read_text()
    assert '"unseen"' in text and (repo / "clipteacher_cosine" / "config.pbtxt").is_file()


@pytest.fixture(scope="module")
def tagclip_bundle(zegclip_checkpoints, tmp_path_factory):
    from clipteacher.export.bundle import export_bundle

    return export_bundle(zegclip_checkpoints["tagclip"], tmp_path_factory.mktemp("tb") / "tagclip_tiny",
                         log=lambda *_: None)


def test_compare_view_runs_the_other_bundles_with_their_pass_times(bundle_dir, tagclip_bundle, tmp_path):
    from clipteacher.app.service import Service
    from clipteacher.runtime import Bundle

    other = Bundle(tagclip_bundle, verbose=False)
    service = Service(Bundle(bundle_dir, verbose=False), others={"TagCLIP (tiny)": Service(other)})
    image, _ = synthetic_sample(np.random.default_rng(3))
    cmp = service.compare(image, "sky, grass, cow, zebra")
    (label, seg, seconds), = cmp.others
    assert label == "TagCLIP (tiny)" and seconds > 0 and other.model_name == "TagCLIP"
    assert np.array_equal(seg.labels, other.segment(image, ["sky", "grass", "cow", "zebra"]))


def test_app_compare_endpoint_with_a_compare_bundle(bundle_dir, tagclip_bundle, tmp_path):
    from gradio_client import Client, handle_file
    from PIL import Image

    from helpers import free_port, start_app

    image, _ = synthetic_sample(np.random.default_rng(4))
    Image.fromarray(image).save(tmp_path / "picture.png")
    port = free_port()
    proc = start_app(bundle_dir, port, tmp_path / "app.log", "--compare-bundle", str(tagclip_bundle))
    try:
        client = Client(f"http://127.0.0.1:{port}/", verbose=False)
        *_, status, others = client.predict(handle_file(str(tmp_path / "picture.png")), "sky, grass", "", None,
                                            api_name="/compare")
        assert len(others) == 1 and "TagCLIP (tagclip_tiny): image pass" in others[0]["caption"]
        assert "TagCLIP" in status
    finally:
        proc.terminate()
        proc.wait(timeout=20)
    assert "Traceback" not in (tmp_path / "app.log").read_text()


def test_predict_writes_each_compared_bundle_and_its_pass_time(bundle_dir, tagclip_bundle, tmp_path):
    import json

    from PIL import Image

    from clipteacher.cli import predict

    for i in range(2):
        Image.fromarray(synthetic_sample(np.random.default_rng(i))[0]).save(tmp_path / f"im{i}.png")
    out = tmp_path / "out"
    assert predict.main([str(tmp_path / "im0.png"), str(tmp_path / "im1.png"), "--names", "sky, grass, cow",
                         "--out", str(out), "--bundle", str(bundle_dir), "--compare-bundle", str(tagclip_bundle)]) == 0
    rows = json.loads((out / "compare.json").read_text())
    assert [r["model"] for r in rows] == ["main", "tagclip_tiny"] and all(r["done"] == 2 for r in rows)
    assert all(r["image_pass_ms_per_image"] > 0 for r in rows)
    assert (out / "im0.png").is_file() and (out / "tagclip_tiny" / "im1.png").is_file()
    assert len((out / "tagclip_tiny" / "summary.jsonl").read_text().splitlines()) == 2


@pytest.mark.parametrize("row", ["maskclip_plus", "maskclip_plus_guided", "zegclip", "tagclip"])
def test_runner_rows_of_the_baselines_make_valid_configs(row):
    """`python -m training.experiments.<benchmark> --rows maskclip_plus,zegclip,tagclip` on either benchmark."""
    from clipteacher.config import apply_overrides
    from training.experiments.runner import ROWS

    for config in ("msrc21.yaml", "siftflow.yaml"):
        cfg = apply_overrides(load_config(ROOT / "training" / "configs" / config), ROWS[row])
        assert cfg.method == ("maskclip_plus" if row.startswith("maskclip") else "zegclip")
        assert cfg.loss.glm_weight == cfg.loss.ce_weight == cfg.loss.gen_weight == 0
        assert cfg.zegclip.trusty == (row == "tagclip")
