"""A client of the Ray Serve deployment's JSON API, so the Gradio app can be its front end (`clipteacher-app
--backend URL`): browser users and API users then share the replicas. Standard library only (no Ray, no torch).

    client = ServeClient("http://head:8000/segment")
    client.info()                                   # the replica's bundle, provider, vocabulary, gamma
    labels, reply = client.segment(jpeg_bytes, "cow, grass", gamma=None)   # labels H x W int64, reply: the JSON

Every failure is a `BackendError` with one line for the person at the UI: the backend's own 4xx message
(bad image, bad names) as it wrote it, or what went wrong on the way (no answer, a busy or broken replica).
"""
from __future__ import annotations

import base64
import binascii
import http.client
import io
import json
import socket
import urllib.error
import urllib.request

import numpy as np

from clipteacher.io import read_label_file
from clipteacher.request import UserError

MAX_REPLY_BYTES = 64_000_000  # a reply's mask PNG of the largest accepted image is far smaller


class BackendError(UserError):
    """The backend refused a request or did not answer (one line)."""


class ServeClient:
    def __init__(self, url: str, timeout: float = 60.0):
        if not url.startswith(("http://", "https://")):
            raise ValueError(f"--backend must be an http(s):// URL of the Serve route, e.g. "
                             f"http://head:8000/segment; got {url[:100]!r}")
        self.url = url.rstrip("/")
        self.timeout = float(timeout)

    def _call(self, data: bytes | None) -> dict:
        request = urllib.request.Request(self.url, data=data, method="POST" if data is not None else "GET",
                                         headers={"Content-Type": "application/json"})
        try:
            with urllib.request.urlopen(request, timeout=self.timeout) as response:
                body = response.read(MAX_REPLY_BYTES + 1)
        except urllib.error.HTTPError as err:  # 4xx / 5xx: the API answers {"error": one line}
            try:
                message = json.loads(err.read(65536))["error"]
            except (ValueError, KeyError, TypeError, http.client.HTTPException, OSError):
                message = ""
            line = (str(message).strip().splitlines() or [f"HTTP {err.code} {err.reason}"])[0]
            if err.code in (400, 413):
                raise BackendError(line[:500]) from None
            raise BackendError(f"The segmentation backend failed ({line[:200]}); try again.") from None
        except (urllib.error.URLError, socket.timeout, ConnectionError, http.client.HTTPException) as err:
            reason = getattr(err, "reason", err)
            raise BackendError(f"The segmentation backend at {self.url} did not answer ({str(reason)[:200]}); "
                               f"try again later.") from None
        if len(body) > MAX_REPLY_BYTES:
            raise BackendError("The segmentation backend's reply is too large.")
        try:
            reply = json.loads(body)
        except ValueError:
            reply = None
        if not isinstance(reply, dict):
            raise BackendError(f"The segmentation backend at {self.url} did not answer with JSON; is it the "
                               f"Serve route (…/segment)?")
        return reply

    def info(self) -> dict:
        """GET: the replica's bundle name, provider, precision, vocabulary and gamma."""
        reply = self._call(None)
        if not isinstance(reply.get("vocabulary"), list):
            raise BackendError(f"{self.url} is not a clipteacher Serve route (its GET has no vocabulary).")
        return reply

    def segment(self, image: bytes, names: str, gamma: float | None = None, templates: str | None = None,
                hubness: bool | None = None) -> tuple[np.ndarray, dict]:
        """The image file's bytes and the typed names -> (labels H x W int64 indices into reply["classes"],
        reply). The backend validates and decodes as the app does, so H x W is the app's own decoded size."""
        body = {"image": base64.b64encode(image).decode("ascii"), "names": names}
        body.update({k: v for k, v in (("gamma", gamma), ("templates", templates), ("hubness", hubness))
                     if v is not None})
        reply = self._call(json.dumps(body).encode())
        try:
            labels = read_label_file(io.BytesIO(base64.b64decode(reply["mask_png"], validate=True))).astype(np.int64)
            classes = reply["classes"]
            shape = (int(reply["height"]), int(reply["width"]))
        except (KeyError, TypeError, ValueError, binascii.Error, OSError):
            raise BackendError("The segmentation backend's reply has no readable mask.") from None
        if labels.shape != shape or not isinstance(classes, list) or (labels.size and labels.max() >= len(classes)):
            raise BackendError("The segmentation backend's reply does not match its own mask.")
        return labels, reply
