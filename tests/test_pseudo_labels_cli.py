import json

import numpy as np
from PIL import Image

from helpers import TINY_CLIP
from clipteacher.cli import pseudo_labels

TEACHER = ["teacher.kind=clip", f"teacher.clip_config={json.dumps(TINY_CLIP)}", "teacher.input_size=64",
           "plm.windows=[2,3]"]


def test_single_image_writes_every_view(tiny_data, tmp_path, capsys):
    image = next((tiny_data / "images").glob("v0.*"))
    label = tiny_data / "labels" / "v0.png"
    code = pseudo_labels.main(["--image", str(image), "--label", str(label), "--out", str(tmp_path), *TEACHER])
    assert code == 0
    names = {p.name for p in tmp_path.iterdir()}
    assert {"v0_k2.png", "v0_k3.png", "v0_fused.png", "v0_overlay.png", "v0_panel.png"} <= names
    w, h = Image.open(image).size
    assert Image.open(tmp_path / "v0_fused.png").size == (w, h)
    assert "regions" in capsys.readouterr().out


def test_split_form_and_wrong_size_label(tiny_data, tmp_path, capsys):
    assert pseudo_labels.main(["--data", str(tiny_data), "--split", "val", "--out", str(tmp_path / "s"), *TEACHER]) == 0
    assert len(list((tmp_path / "s").glob("*_panel.png"))) == 2
    capsys.readouterr()
    bad = tmp_path / "bad.png"
    Image.fromarray(np.zeros((5, 5), dtype=np.uint8)).save(bad)
    image = next((tiny_data / "images").glob("v0.*"))
    code = pseudo_labels.main(["--image", str(image), "--label", str(bad), "--out", str(tmp_path / "b"), *TEACHER])
    err = capsys.readouterr().err
    assert code == 2 and "bad.png" in err and len(err.strip().splitlines()) == 1
