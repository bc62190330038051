#!/usr/bin/env bash
# docker/smoke.sh: build the repository's Dockerfile and prove the image serves, on a machine with no Docker
# engine and no image registry (Debian bookworm, as root; buildah + podman with runc, debootstrap).
#
#   bash docker/smoke.sh [-t TAG]          (default TAG localhost/clipteacher-app:smoke)
#
# The Dockerfile is built unchanged; only its base images are replaced, through its build arguments, by local
# stand-ins made once from a debootstrapped Debian: APP_BASE_IMAGE = plain Debian with python3 and python3-venv
# ($SMOKE_BASE_IMAGE), PY_IMAGE = the same with a venv on PATH, so `python` and `pip` work as in python:3.11-slim
# ($SMOKE_PY_IMAGE). Phases, each timed:
#   tools    apt-get install podman buildah debootstrap runc if one is missing
#   base     debootstrap + podman import (and buildah for the venv) unless both base images exist
#   build    buildah build --format docker (HEALTHCHECK needs it) with this machine's pip settings mounted into
#            every RUN step (pip reaches the registries only with them; mounts are not committed)
#   inspect  no host pip file in the image, no torch; size, HEALTHCHECK and PORT from `podman image inspect`
#   start    the image's own CMD in a container (host network, PORT = a free port)
#   health   the image's HEALTHCHECK command, run inside the container until it passes
#   api      /info and /segment through gradio_client from this machine; the mask is checked
#   libs     clipteacher/runtime/cuda_libs.py inside the container: nothing but libcuda.so.1 may be missing
#   strict   a second container with CLIPTEACHER_DEVICE=cuda must exit 2 with one line (there is no GPU here)
#   stop     podman stop (SIGTERM through --init), then the container is removed
# The last line is `smoke: ok ...` naming the image size (exit 0) or `smoke: FAILED: <reason>` (exit 1).
#
# Environment (all optional): SMOKE_ROOTFS=/var/tmp/clipteacher-rootfs, SMOKE_SUITE=bookworm, SMOKE_MIRROR,
# SMOKE_BASE_IMAGE=localhost/clipteacher-base:bookworm, SMOKE_PY_IMAGE=localhost/clipteacher-py:bookworm,
# SMOKE_BUILD_ARGS="K=V ..." (more --build-arg, e.g. PIP_EXTRA_INDEX_URL), SMOKE_NO_CACHE=1 (no layer cache),
# SMOKE_HEALTH_TIMEOUT=300, SMOKE_PYTHON=python3 (needs gradio_client), SMOKE_LOGDIR (default mktemp -d).
set -Eeuo pipefail

repo="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
helpers="$repo/docker/smoke_helpers.py"
tag="localhost/clipteacher-app:smoke"
while getopts "t:h" opt; do
  case "$opt" in t) tag="$OPTARG" ;; *) sed -n '2,29p' "$0"; exit 2 ;; esac
done
SUITE="${SMOKE_SUITE:-bookworm}"
ROOTFS="${SMOKE_ROOTFS:-/var/tmp/clipteacher-rootfs}"
BASE_IMAGE="${SMOKE_BASE_IMAGE:-localhost/clipteacher-base:$SUITE}"
PY_IMAGE="${SMOKE_PY_IMAGE:-localhost/clipteacher-py:$SUITE}"
PY="${SMOKE_PYTHON:-python3}"
HEALTH_TIMEOUT="${SMOKE_HEALTH_TIMEOUT:-300}"
LOGDIR="${SMOKE_LOGDIR:-$(mktemp -d /tmp/smoke.XXXXXX)}"
mkdir -p "$LOGDIR"
CNAME="clipteacher-smoke-$$"
NICE=(nice -n 10)  # the machine is shared: builds and bootstraps yield to other work
STDPATH="/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"

phase="setup"; reason=""; timings=(); started=""; status="FAILED"; pipdir=""; t_phase=$SECONDS
log() { printf '[smoke %s] %s\n' "$phase" "$*" >&2; }
fail() { reason="$*"; exit 1; }
begin() { phase="$1"; t_phase=$SECONDS; log "start"; }
done_phase() { timings+=("$phase=$((SECONDS - t_phase))s"); }
helper() { "$PY" "$helpers" "$@"; }

cleanup() {
  local rc=$?
  set +e; trap - ERR
  if [[ -n "$started" ]]; then
    podman stop -t 10 "$CNAME" >>"$LOGDIR/podman.log" 2>&1
    podman logs "$CNAME" >"$LOGDIR/container.log" 2>&1
    podman rm -f "$CNAME" >>"$LOGDIR/podman.log" 2>&1
  fi
  [[ -n "$pipdir" ]] && rm -rf "$pipdir"
  echo "timings: ${timings[*]} total=${SECONDS}s; logs in $LOGDIR" >&2
  if [[ "$status" == ok ]]; then
    echo "smoke: ok image=$tag size=$size_h (nvidia wheels $nvidia_h, no torch) $api_line" \
         "libs=ok(${libs_line#*; }" "healthy_after=${health_s}s total=${SECONDS}s"
    exit 0
  fi
  echo "smoke: FAILED: ${reason:-phase '$phase' failed (exit $rc)}"
  exit 1
}
trap cleanup EXIT
trap 'reason="${reason:-phase $phase: command failed at line $LINENO: $BASH_COMMAND}"' ERR
trap 'reason="interrupted"; exit 1' INT TERM

[[ $EUID -eq 0 ]] || fail "must run as root (buildah chroot isolation, debootstrap, podman image mount)"

# ------------------------------------------------------------------------------------------- tools
begin tools
need=()
for c in podman buildah debootstrap runc; do command -v "$c" >/dev/null || need+=("$c"); done
if ((${#need[@]})); then
  log "installing ${need[*]}"
  { apt-get update -qq && DEBIAN_FRONTEND=noninteractive "${NICE[@]}" apt-get install -y -qq "${need[@]}"; } \
    >"$LOGDIR/apt.log" 2>&1 || fail "apt-get install ${need[*]} failed (see $LOGDIR/apt.log)"
fi
"$PY" -c "import gradio_client, PIL, numpy" 2>/dev/null \
  || fail "$PY cannot import gradio_client, PIL and numpy (pip install gradio_client pillow numpy, or set SMOKE_PYTHON)"
done_phase

# ------------------------------------------------------------------------------------------- base
begin base
if podman image exists "$BASE_IMAGE" && podman image exists "$PY_IMAGE"; then
  log "reusing $BASE_IMAGE and $PY_IMAGE"
else
  if [[ ! -f "$ROOTFS/.smoke-complete" ]]; then
    mirror="${SMOKE_MIRROR:-$(helper apt-mirror "$SUITE")}" || fail "no apt mirror for $SUITE; set SMOKE_MIRROR"
    log "debootstrap $SUITE from $mirror into $ROOTFS"
    rm -rf "$ROOTFS.tmp"
    "${NICE[@]}" debootstrap --variant=minbase --include=python3,python3-venv,ca-certificates \
      "$SUITE" "$ROOTFS.tmp" "$mirror" >"$LOGDIR/debootstrap.log" 2>&1 \
      || fail "debootstrap failed (see $LOGDIR/debootstrap.log)"
    rm -rf "$ROOTFS"; mv "$ROOTFS.tmp" "$ROOTFS"; touch "$ROOTFS/.smoke-complete"
  fi
  log "importing $ROOTFS as $BASE_IMAGE"
  tar -C "$ROOTFS" --exclude=./.smoke-complete --exclude='./var/lib/apt/lists/*' --exclude='./var/cache/apt/*' \
      --exclude=./etc/resolv.conf --exclude=./etc/hostname -c . \
    | podman import --change "ENV PATH=$STDPATH" --change "ENV LANG=C.UTF-8" --change 'CMD ["/bin/bash"]' \
      - "$BASE_IMAGE" >"$LOGDIR/import.log" 2>&1 || fail "podman import failed (see $LOGDIR/import.log)"
  log "creating $PY_IMAGE (a venv in /opt/py on PATH)"
  c=$(buildah from --pull=never "$BASE_IMAGE")
  { buildah run --isolation chroot "$c" -- python3 -m venv /opt/py \
    && buildah config --env "PATH=/opt/py/bin:$STDPATH" --cmd '["python3"]' "$c" \
    && buildah commit --rm "$c" "$PY_IMAGE"; } >>"$LOGDIR/import.log" 2>&1 \
    || { buildah rm "$c" >/dev/null 2>&1; fail "creating $PY_IMAGE failed (see $LOGDIR/import.log)"; }
fi
done_phase

# ------------------------------------------------------------------------------------------- build
begin build
# pip's settings here (pip config list: /etc/pip.conf, the user's pip.conf, PIP_* variables) become one pip.conf
# at /etc/pip.conf in every RUN step, its certificate copied next to it in /run/smoke-pip (not over the image's
# own CA bundle, which a RUN step may rewrite); local index folders are mounted read-only at their own paths.
pipdir=$(mktemp -d /tmp/smoke-pip.XXXXXX)
mounts=(-v "$pipdir:/run/smoke-pip:ro" -v "$pipdir/pip.conf:/etc/pip.conf:ro")
mount_targets=(/etc/pip.conf /run/smoke-pip)
while read -r folder; do
  [[ -e "$folder" ]] || continue
  mounts+=(-v "$folder:$folder:ro"); mount_targets+=("$folder")
done < <(pip config list 2>/dev/null | helper pip-conf "$pipdir")
[[ -s "$pipdir/pip.conf" ]] || fail "could not write the build's pip.conf from pip config list"
log "pip settings in the build: $(grep -v '^\[' "$pipdir/pip.conf" | tr '\n' ' ')"
build_args=(--build-arg "PY_IMAGE=$PY_IMAGE" --build-arg "APP_BASE_IMAGE=$BASE_IMAGE")
read -ra extra <<<"${SMOKE_BUILD_ARGS:-}"
for a in "${extra[@]}"; do build_args+=(--build-arg "$a"); done
layers=(--layers); [[ "${SMOKE_NO_CACHE:-0}" == 1 ]] && layers=(--layers=false)
old_id=$(podman image inspect -f '{{.Id}}' "$tag" 2>/dev/null || true)
log "buildah build ${build_args[*]} -> $tag (log: $LOGDIR/build.log)"
"${NICE[@]}" buildah build --isolation chroot --format docker --pull=never "${layers[@]}" "${build_args[@]}" \
  "${mounts[@]}" -f "$repo/Dockerfile" -t "$tag" "$repo" >"$LOGDIR/build.log" 2>&1 \
  || fail "build failed: $(grep -iE 'error' "$LOGDIR/build.log" | tail -1 | cut -c1-300) (see $LOGDIR/build.log)"
new_id=$(podman image inspect -f '{{.Id}}' "$tag")
if [[ -n "$old_id" && "$old_id" != "$new_id" ]]; then podman rmi "$old_id" >/dev/null 2>&1 || true; fi
done_phase

# ------------------------------------------------------------------------------------------- inspect
begin inspect
mnt=$(podman image mount "$tag")
leaks=()
for t in "${mount_targets[@]}"; do
  if [[ -f "$mnt$t" && -s "$mnt$t" ]] || [[ -d "$mnt$t" && -n "$(ls -A "$mnt$t" 2>/dev/null)" ]]; then leaks+=("$t"); fi
done
site=$(compgen -G "$mnt/opt/venv/lib/python3*/site-packages" | head -1 || true)
has_torch=""; [[ -n "$site" && -e "$site/torch" ]] && has_torch=1
nvidia_b=0; [[ -n "$site" && -d "$site/nvidia" ]] && nvidia_b=$(du -sb "$site/nvidia" | cut -f1)
podman image unmount "$tag" >/dev/null
[[ -n "$site" ]] || fail "no /opt/venv/lib/python3*/site-packages in the image"
((${#leaks[@]} == 0)) || fail "host files baked into the image: ${leaks[*]}"
[[ -z "$has_torch" ]] || fail "torch is in the final image (${site#"$mnt"}/torch)"
eval "$(podman image inspect "$tag" | helper image-facts)"
size_h=$(helper human "$size_b"); nvidia_h=$(helper human "${nvidia_b:-0}")
[[ "$hc_kind" == CMD || "$hc_kind" == CMD-SHELL ]] || fail "the image has no HEALTHCHECK (built without --format docker?)"
[[ -n "$img_port" ]] || fail "the image sets no PORT"
port=$(helper free-port)
log "size $size_h (nvidia wheels $nvidia_h), no torch, HEALTHCHECK ${hc_kind} ${hc_args[*]}; PORT $img_port -> $port"
done_phase

# ------------------------------------------------------------------------------------------- start
begin start
# runc: crun refuses this machine's hybrid cgroups. Explicit ulimits: podman's defaults exceed the hard limits
# here (setrlimit: Operation not permitted). --init: the app is not PID 1, so SIGTERM stops it.
# --health-interval=disable: podman would schedule the check with a systemd timer; this script runs it itself.
run_opts=(--runtime runc --pull=never --init --network host --ulimit "nofile=$(ulimit -Hn):$(ulimit -Hn)"
          --ulimit nproc=32768:32768 --health-interval=disable)
podman run -d --name "$CNAME" "${run_opts[@]}" -e "PORT=$port" "$tag" >"$LOGDIR/podman.log" 2>&1 \
  || fail "podman run failed: $(tail -1 "$LOGDIR/podman.log")"
started=1
running() { [[ "$(podman inspect -f '{{.State.Running}}' "$CNAME" 2>/dev/null)" == true ]]; }
ctr_tail() { podman logs --tail 5 "$CNAME" 2>&1 | tail -3 | tr '\n' ' '; }
done_phase

# ------------------------------------------------------------------------------------------- health
begin health
deadline=$((SECONDS + HEALTH_TIMEOUT)); t0=$SECONDS; tries=0
while :; do
  running || fail "the container exited before it became healthy: $(ctr_tail)"
  tries=$((tries + 1))
  if [[ "$hc_kind" == CMD ]]; then
    timeout 60 podman exec "$CNAME" "${hc_args[@]}" >"$LOGDIR/health.log" 2>&1 && break
  else
    timeout 60 podman exec "$CNAME" /bin/sh -c "${hc_args[0]}" >"$LOGDIR/health.log" 2>&1 && break
  fi
  ((SECONDS < deadline)) || fail "HEALTHCHECK did not pass within ${HEALTH_TIMEOUT}s ($tries tries): $(tail -1 "$LOGDIR/health.log")"
  sleep 2
done
health_s=$((SECONDS - t0))
log "healthy after ${health_s}s ($tries tries)"
done_phase

# ------------------------------------------------------------------------------------------- api
begin api
api_line=$(helper api "http://127.0.0.1:$port/" "$repo/clipteacher/app/examples/farm.jpg" "building, grass, tree, cow, sky, zebra" \
           2>"$LOGDIR/api.log") || fail "$(tail -1 "$LOGDIR/api.log")"
log "$api_line"
done_phase

# ------------------------------------------------------------------------------------------- libs
begin libs
podman exec "$CNAME" python /app/clipteacher/runtime/cuda_libs.py >"$LOGDIR/libs.log" 2>&1 \
  || { cat "$LOGDIR/libs.log" >&2; fail "$(tail -1 "$LOGDIR/libs.log")"; }
cat "$LOGDIR/libs.log" >&2
libs_line=$(tail -1 "$LOGDIR/libs.log")
[[ "$libs_line" == *"missing only libcuda.so.1"* || "$libs_line" == *"nothing missing"* ]] || fail "$libs_line"
done_phase

# ------------------------------------------------------------------------------------------- strict
begin strict
set +e
timeout 300 podman run --rm --name "$CNAME-strict" "${run_opts[@]}" -e CLIPTEACHER_DEVICE=cuda \
  -e "PORT=$(helper free-port)" "$tag" >"$LOGDIR/strict.out" 2>"$LOGDIR/strict.err"
code=$?
set -e
podman rm -f "$CNAME-strict" >/dev/null 2>&1 || true  # still there only if the timeout stopped podman
# podman's own log lines (time="..." level=...: it has no systemd here for health timers) are not the app's
mapfile -t strict_err < <(grep -vE '^\s*$|^time="[^"]*" level=' "$LOGDIR/strict.err")
((code == 2)) || fail "CLIPTEACHER_DEVICE=cuda without a GPU: exit code $code, expected 2 ($(tail -1 "$LOGDIR/strict.err"))"
((${#strict_err[@]} == 1)) || fail "CLIPTEACHER_DEVICE=cuda: ${#strict_err[@]} lines on stderr, expected 1"
log "exit 2: ${strict_err[0]}"
done_phase

# ------------------------------------------------------------------------------------------- stop
begin stop
podman stop -t 10 "$CNAME" >>"$LOGDIR/podman.log" 2>&1 || fail "podman stop failed"
code=$(podman inspect -f '{{.State.ExitCode}}' "$CNAME")
podman logs "$CNAME" >"$LOGDIR/container.log" 2>&1 || true
podman rm -f "$CNAME" >>"$LOGDIR/podman.log" 2>&1
started=""
log "stopped (exit code $code); container log: $LOGDIR/container.log"
done_phase
status=ok
