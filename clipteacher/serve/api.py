"""The JSON segmentation API, without a web framework: request bytes in, (status, JSON-ready dict) out.

    POST {"image": "<base64 PNG/JPEG/WebP>", "names": "cow, grass" | ["cow", "grass"],
          "gamma": 1.5 (optional), "templates": "a photo of a {}." (optional), "hubness": true (optional)}
    200  {"classes": [...], "shares": {name: share of pixels}, "mask_png": "<base64 palette PNG>",
          "width": W, "height": H, "notes": [...], "seconds": s}
    4xx  {"error": "one line"}

The same limits and messages as the app (`clipteacher.request`): the body is capped before it is read
(`MAX_UPLOAD_MB`, the app's default), the image before it is decoded, names, templates and gamma are parsed
by the app's own parsers. The mask PNG is the app's download (`request.mask_png`: pixel = index into
"classes", which its "classes" text chunk repeats).
"""
from __future__ import annotations

import base64
import binascii
import io
import json
import time
from dataclasses import dataclass, field

import numpy as np

from clipteacher.request import UserError, load_image, parse_gamma, parse_names, parse_templates

MAX_UPLOAD_MB = 20.0  # the app's default upload cap (clipteacher-app --max-upload-mb)


class ApiError(ValueError):
    """A request answered with an HTTP error status and one line."""

    def __init__(self, status: int, message: str):
        super().__init__(message)
        self.status = status


@dataclass
class Job:
    """One parsed request: H x W x 3 uint8 RGB image and its classification settings."""

    image: np.ndarray
    names: list[str]
    gamma: float | None
    templates: tuple[str, ...] | None
    hubness: bool | None
    notes: list[str] = field(default_factory=list)


def check_length(length: int | None, max_mb: float = MAX_UPLOAD_MB) -> None:
    """Refuse a body by its declared length before reading it."""
    if length is not None and length > max_mb * 1e6 * 4 / 3 + 65536:  # base64 grows the image by 4/3
        raise ApiError(413, f"The request is {length / 1e6:.1f} MB; images up to {max_mb:g} MB are accepted.")


def parse_request(body: bytes, max_mb: float = MAX_UPLOAD_MB) -> Job:
    check_length(len(body), max_mb)
    try:
        payload = json.loads(body)
    except (UnicodeDecodeError, json.JSONDecodeError, RecursionError):
        raise ApiError(400, 'The body must be JSON: {"image": "<base64>", "names": "cow, grass"}.') from None
    if not isinstance(payload, dict):
        raise ApiError(400, 'The body must be a JSON object with "image" and "names".')
    unknown = sorted(set(payload) - {"image", "names", "gamma", "templates", "hubness"})
    if unknown:
        raise ApiError(400, f"Unknown field {unknown[0][:40]!r}; the fields are image, names, gamma, templates, hubness.")
    data = payload.get("image")
    if not isinstance(data, str) or not data:
        raise ApiError(400, '"image" must be the image file\'s bytes as a base64 string.')
    try:
        raw = base64.b64decode(data, validate=True)
    except (binascii.Error, ValueError):
        raise ApiError(400, '"image" is not valid base64.') from None
    if len(raw) > max_mb * 1e6:
        raise ApiError(413, f"The image is {len(raw) / 1e6:.1f} MB; up to {max_mb:g} MB is accepted.")
    names = payload.get("names")
    if isinstance(names, list) and all(isinstance(n, str) for n in names):
        names = ", ".join(n.replace(",", " ") for n in names)
    if not isinstance(names, str):
        raise ApiError(400, '"names" must be a string ("cow, grass") or a list of strings.')
    templates = payload.get("templates")
    if templates is not None and not isinstance(templates, str):
        raise ApiError(400, '"templates" must be a string (one template per line, each with one {}).')
    hubness = payload.get("hubness")
    if hubness is not None and not isinstance(hubness, bool):
        raise ApiError(400, '"hubness" must be true, false or absent.')
    gamma = payload.get("gamma")
    if isinstance(gamma, bool) or not (gamma is None or isinstance(gamma, (int, float, str))):
        raise ApiError(400, '"gamma" must be a number or absent.')
    try:
        name_list, notes = parse_names(names)
        job = Job(np.zeros((1, 1, 3), np.uint8), name_list, parse_gamma(gamma), parse_templates(templates), hubness,
                  list(notes))
        job.image, image_notes = load_image(io.BytesIO(raw), name="the image")
    except UserError as err:
        raise ApiError(400, str(err)) from None
    job.notes += image_notes
    return job


def answer(job: Job, encoded: dict, started: float) -> dict:
    """A job's outputs (`clipteacher.batch.encode_outputs`) -> the 200 response body."""
    return {"classes": job.names, "shares": encoded["item"]["shares"],
            "mask_png": base64.b64encode(encoded["mask"]).decode("ascii"), "width": encoded["item"]["width"],
            "height": encoded["item"]["height"], "notes": job.notes, "seconds": round(time.perf_counter() - started, 4)}


def error_body(err: BaseException) -> tuple[int, dict]:
    """Any failure -> (status, {"error": one line}); internal errors name their type, not a traceback."""
    if isinstance(err, ApiError):
        return err.status, {"error": str(err)}
    if isinstance(err, (UserError, ValueError)):
        return 400, {"error": str(err).splitlines()[0] if str(err) else type(err).__name__}
    if isinstance(err, MemoryError):
        return 503, {"error": "Out of memory for this image; try a smaller one."}
    return 500, {"error": f"internal error ({type(err).__name__})"}
