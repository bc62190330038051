"""Ray Serve deployment: replicas that each hold one ONNX bundle, behind one HTTP route.

    serve run deploy/ray/serve.yaml                          # this machine (starts a local Ray)
    ray start --head && serve deploy deploy/ray/serve.yaml   # a cluster (GPU replicas: num_gpus in the YAML)
    curl -X POST localhost:8000/segment -d '{"image": "<base64>", "names": "cow, grass"}'
    curl localhost:8000/segment                              # GET: the replica's bundle, provider, vocabulary

Each replica opens the bundle once (CUDA when onnxruntime can use the replica's GPU, else CPU; the provider
it got is logged and returned by GET, as the app reports it). Concurrent requests to a replica are parsed
and decoded independently, then their images meet in `@serve.batch`: images of one size share a run of
the student (`Bundle.batch_features`), each request is classified against its own names (text
embeddings cached per replica by the bundle). The request format and its errors are `clipteacher.serve.api`.
"""
from __future__ import annotations

import asyncio
import logging
import os
import time

from ray import serve
from starlette.requests import Request
from starlette.responses import JSONResponse

from clipteacher.serve.api import MAX_UPLOAD_MB, ApiError, answer, check_length, error_body, parse_request

log = logging.getLogger("ray.serve")
MAX_BATCH = 8  # images per student run
BATCH_WAIT_S = 0.005  # how long a replica waits for more images to share a run


@serve.deployment(ray_actor_options={"num_cpus": 1}, max_ongoing_requests=16)
class Segmenter:
    """One replica: a bundle, the batched student pass and per-request classification."""

    def __init__(self, bundle: str | None = None, precision: str = "fp32", threads: int = 1,
                 max_upload_mb: float = MAX_UPLOAD_MB, max_batch: int = MAX_BATCH, batch_wait_s: float = BATCH_WAIT_S):
        from clipteacher.runtime import Bundle
        from clipteacher.runtime.resolve import resolve_bundle

        self.bundle = Bundle(resolve_bundle(bundle), precision=precision, verbose=False, threads=threads, spin=False)
        self.max_upload_mb = float(max_upload_mb)
        self.features.set_max_batch_size(int(max_batch))
        self.features.set_batch_wait_timeout_s(float(batch_wait_s))
        self.replica = serve.get_replica_context().replica_id.unique_id if _in_serve() else f"local-{os.getpid()}"
        self.bundle.embed_text(["warm-up"])  # load the text encoder now, not on the first request
        log.info("replica %s serves %s on %s", self.replica, self.bundle.folder.name, self.bundle.provider)

    @serve.batch
    async def features(self, images: list) -> list:
        """N images (H x W x 3 uint8, any sizes) -> N features (1 x D x h x w) or the exception of that image."""
        from clipteacher.batch import student_passes

        return await asyncio.to_thread(student_passes, self.bundle, images)

    async def segment(self, body: bytes) -> dict:
        started = time.perf_counter()
        job = await asyncio.to_thread(parse_request, body, self.max_upload_mb)
        feats = await self.features(job.image)
        if isinstance(feats, Exception):
            raise feats
        from clipteacher.batch import encode_outputs

        encoded = await asyncio.to_thread(encode_outputs, self.bundle, job.image, job.notes, feats, job.names,
                                          job.gamma, job.templates, False, job.hubness)
        out = answer(job, encoded, started)
        out["replica"] = self.replica
        return out

    def info(self) -> dict:
        b = self.bundle
        return {"bundle": b.folder.name, "provider": b.provider, "precision": b.precision, "replica": self.replica,
                "vocabulary": b.vocabulary, "gamma": b.gamma, "max_upload_mb": self.max_upload_mb}

    async def __call__(self, request: Request) -> JSONResponse:
        try:
            if request.method == "GET":
                return JSONResponse(self.info())
            if request.method != "POST":
                raise ApiError(405, "Use POST with a JSON body (or GET for the model's description).")
            length = request.headers.get("content-length")
            check_length(int(length) if length and length.isdigit() else None, self.max_upload_mb)
            body = await read_capped(request, self.max_upload_mb)
            return JSONResponse(await self.segment(body))
        except Exception as err:  # noqa: BLE001 - every failure is one line, the replica keeps serving
            status, payload = error_body(err)
            if status >= 500:
                log.warning("replica %s: %s", self.replica, payload["error"])
            return JSONResponse(payload, status_code=status)


async def read_capped(request: Request, max_mb: float) -> bytes:
    """The body, refused as soon as it grows past the cap (a client may send no or a false Content-Length)."""
    chunks, size = [], 0
    async for chunk in request.stream():
        size += len(chunk)
        check_length(size, max_mb)
        chunks.append(chunk)
    return b"".join(chunks)


def _in_serve() -> bool:
    try:
        serve.get_replica_context()
        return True
    except Exception:  # noqa: BLE001 - outside a replica
        return False


def app(args: dict) -> serve.Application:
    """Application builder for `serve run` / `serve deploy` (the YAML's import_path): args are Segmenter's."""
    return Segmenter.bind(**(args or {}))
