"""The Python steps of docker/smoke.sh (stdlib only, except `api`, which needs gradio_client and pillow).

    smoke_helpers.py apt-mirror SUITE          the Debian mirror apt uses for SUITE (for debootstrap)
    smoke_helpers.py pip-conf DIR < `pip config list`
                                               this machine's pip settings as DIR/pip.conf (its certificate copied
                                               into DIR); prints the local index folders to mount
    smoke_helpers.py image-facts < `podman image inspect IMAGE`
                                               shell assignments: size_b, hc_kind, hc_args, img_port
    smoke_helpers.py free-port                 a free TCP port on 127.0.0.1
    smoke_helpers.py human BYTES               "2.80 GB" / "630 MB"
    smoke_helpers.py api URL IMAGE NAMES       /info and /segment through gradio_client; checks the mask
"""
from __future__ import annotations

import base64
import glob
import io
import json
import os
import re
import shlex
import shutil
import socket
import sys

CERT_DIR_IN_BUILD = "/run/smoke-pip"  # where smoke.sh mounts DIR inside every RUN step
FILE_LISTS = ("constraint", "requirement")  # pip settings whose values are files to read


def apt_mirror(suite: str) -> str:
    files = ["/etc/apt/sources.list"] + sorted(glob.glob("/etc/apt/sources.list.d/*.list")) \
        + sorted(glob.glob("/etc/apt/sources.list.d/*.sources"))
    for path in files:
        try:
            text = open(path).read()
        except OSError:
            continue
        if path.endswith(".sources"):  # deb822 stanzas
            for stanza in re.split(r"\n\s*\n", text):
                fields = {m.group(1).lower(): m.group(2) for m in re.finditer(r"^([A-Za-z-]+):\s*(.*)$", stanza, re.M)}
                if "deb" in fields.get("types", "").split() and suite in fields.get("suites", "").split():
                    return fields["uris"].split()[0]
        else:
            for line in text.splitlines():
                m = re.match(r"^\s*deb\s+(?:\[[^]]*\]\s+)?(\S+)\s+(\S+)", line)
                if m and m.group(2) == suite:
                    return m.group(1)
    raise SystemExit(f"no apt source for {suite} in /etc/apt/sources.list*; set SMOKE_MIRROR")


def pip_conf(out_dir: str, listing: str) -> list[str]:
    """`pip config list` (files and PIP_* variables, the variables winning as in pip) -> out_dir/pip.conf with the
    certificate copied next to it; returns the local folders its indexes and find-links name."""
    env, conf = {}, {}
    for line in listing.splitlines():
        m = re.match(r"^(:env:|[a-z]+)\.([A-Za-z0-9_-]+)=(.*)$", line.strip())
        if m:
            (env if m.group(1) == ":env:" else conf)[m.group(2)] = m.group(3).strip().strip("'\"")
    conf.update(env)
    for key in ("cert", "client-cert"):
        if conf.get(key):
            shutil.copy(conf[key], f"{out_dir}/{key}.pem")
            conf[key] = f"{CERT_DIR_IN_BUILD}/{key}.pem"
    # Files named by constraint / requirement (one or more, space separated) are copied in as well: the build's
    # pip reads them at /run/smoke-pip, where the host's paths do not exist.
    for key in FILE_LISTS:
        if conf.get(key):
            copied = []
            for k, path in enumerate(conf[key].split()):
                name = f"{key}-{k}-{os.path.basename(path)}"
                shutil.copy(path, f"{out_dir}/{name}")
                copied.append(f"{CERT_DIR_IN_BUILD}/{name}")
            conf[key] = " ".join(copied)
    folders = []
    for key in ("find-links", "index-url", "extra-index-url"):
        for value in conf.get(key, "").split():
            path = value[len("file://"):] if value.startswith("file://") else value
            if path.startswith("/"):
                if key.endswith("index-url") and path.rstrip("/").endswith("/simple"):
                    path = path.rstrip("/")[: -len("/simple")]  # the index and the files its pages link to
                if path not in folders:
                    folders.append(path)
    with open(f"{out_dir}/pip.conf", "w") as f:
        f.write("[global]\n" + "".join(f"{k} = {v}\n" for k, v in sorted(conf.items())))
    return folders


def image_facts(inspect_json: str) -> str:
    d = json.loads(inspect_json)[0]
    cfg = d.get("Config") or {}
    hc = d.get("Healthcheck") or cfg.get("Healthcheck") or {}
    test = hc.get("Test") or []
    env = dict(e.split("=", 1) for e in cfg.get("Env") or [])
    q = shlex.quote
    return "\n".join([f"size_b={int(d.get('Size', 0))}", f"hc_kind={q(test[0] if test else 'NONE')}",
                      f"hc_args=({' '.join(q(a) for a in test[1:])})", f"img_port={q(env.get('PORT', ''))}"])


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def human(n: float) -> str:
    return f"{n / 1e9:.2f} GB" if n >= 1e9 else f"{n / 1e6:.0f} MB"


def inline_bytes(value: dict) -> bytes:
    """A file the app sends inside its response: a FileData whose url is a base64 data URL."""
    head, _, data = str(value.get("url") or "").partition(",")
    if not (head.startswith("data:") and head.endswith(";base64")):
        raise SystemExit(f"api: expected a file inside the response (a data URL), got {str(value)[:80]}")
    return base64.b64decode(data)


def api(url: str, image: str, names: str) -> str:
    """/info and /segment on the running app; the mask must be the image's size with labels in the names."""
    import numpy as np
    from gradio_client import Client, handle_file
    from PIL import Image

    client = Client(url, verbose=False)
    info = client.predict(api_name="/info")
    overlay, _, shares, mask, _ = client.predict(handle_file(image), names, "", 1.5, api_name="/segment")
    wanted = [n.strip() for n in names.split(",")]
    with Image.open(image) as im:
        size = im.size
    with Image.open(io.BytesIO(inline_bytes(mask))) as im:
        labels, classes, mask_size = np.asarray(im), json.loads(im.info["classes"]), im.size
    with Image.open(io.BytesIO(inline_bytes(overlay))) as im:
        overlay_size = im.size
    present = sorted({wanted[i] for i in np.unique(labels)}) if labels.max() < len(wanted) else None
    problems = [p for p, bad in [(f"mask {mask_size} for an image of {size}", mask_size != size),
                                 (f"overlay {overlay_size} for an image of {size}", overlay_size != size),
                                 (f"labels up to {labels.max()} for {len(wanted)} names", present is None),
                                 (f"mask classes {classes} != {wanted}", classes != wanted),
                                 (f"shares name {sorted(c['label'] for c in shares['confidences'])}, mask {present}",
                                  present is not None and sorted(c["label"] for c in shares["confidences"]) != present)]
                if bad]
    if problems:
        raise SystemExit("api: " + "; ".join(problems))
    fallback = f" (GPU not used: {info['fallback_reason']})" if info["fallback_reason"] else ""
    return f"provider={info['provider']}{fallback} mask={mask_size[0]}x{mask_size[1]} classes={','.join(present)}"


def main(argv: list[str]) -> int:
    command, args = argv[0], argv[1:]
    if command == "apt-mirror":
        print(apt_mirror(args[0]))
    elif command == "pip-conf":
        print("\n".join(pip_conf(args[0], sys.stdin.read())))
    elif command == "image-facts":
        print(image_facts(sys.stdin.read()))
    elif command == "free-port":
        print(free_port())
    elif command == "human":
        print(human(float(args[0])))
    elif command == "api":
        print(api(*args))
    else:
        raise SystemExit(__doc__)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
