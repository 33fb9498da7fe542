#!/usr/bin/env bash
# Build the epvs-bids image with podman and run it as a user would; print a Markdown record.
#
#   sudo scripts/container_check.sh [RESULT.md]      (root: podman, runc and debootstrap are installed with apt)
#
# 1. installs podman, runc and debootstrap from Debian (apt) when absent;
# 2. makes a Debian bookworm base image with python3.11 locally (debootstrap, no registry but Debian's);
# 3. builds ./Dockerfile unchanged, with build arguments only: BASE_IMAGE, TORCH_INDEX_URL, the host's pip
#    settings (index, find-links, certificate: bind-mounted read-only into the build, never copied into a
#    layer) and TEMPLATEFLOW_FETCH (0 unless EPVS_TEMPLATEFLOW_FETCH=1);
# 4. runs the image: --help, --version, the demo, the participant level on a two-subject dataset mounted
#    read-only with --read-only and --network none, as the image's default user and as --user of a non-root
#    caller, the README's command as written, an arbitrary uid with HOME unset (what Apptainer does), the
#    unwritable-output error, CPU limits (--cpuset-cpus), then the group level; checks exit codes, outputs and
#    that the input is unchanged; records build time, image size and where the space goes.
# Exit status: 0 when every check passed, 1 when one failed, 77 when containers cannot run here.
# Environment: EPVS_CT_WORK (scratch folder, default /var/tmp/epvs-ct), EPVS_CT_IMAGE (tag, default
# localhost/epvs-bids:check), EPVS_CT_REBUILD_BASE=1 (redo debootstrap), EPVS_TEMPLATEFLOW_FETCH.
set -uo pipefail
cd "$(dirname "$0")/.."
REPO=$(pwd)
RESULT=${1:-}
WORK=${EPVS_CT_WORK:-/var/tmp/epvs-ct}
IMAGE=${EPVS_CT_IMAGE:-localhost/epvs-bids:check}
BASE=localhost/epvs-base:bookworm-py311
PY=${PYTHON:-python3}
mkdir -p "$WORK"; chmod 755 "$WORK"  # the README check's non-root caller works in here
LOG="$WORK/check.log"
: >"$LOG"
FAILED=0
ROWS=()

note() { echo "[container_check] $*" | tee -a "$LOG" >&2; }
record() {  # record NAME OK|FAIL DETAIL
  ROWS+=("| $1 | $2 | $3 |")
  [ "$2" = OK ] || FAILED=1
  note "$2 $1: $3"
}
skip() { note "SKIP: $*"; echo "container checks skipped: $*"; exit 77; }

# ------------------------------------------------------------------ 1. tools
[ "$(id -u)" = 0 ] || skip "needs root (apt-get, rootful podman, chown of test folders)"
if ! command -v podman >/dev/null || ! command -v runc >/dev/null || ! command -v debootstrap >/dev/null; then
  command -v apt-get >/dev/null || skip "no apt-get to install podman, runc and debootstrap"
  note "installing podman runc debootstrap (apt)"
  (apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq podman runc debootstrap uidmap \
    >>"$LOG" 2>&1) || skip "apt-get could not install podman, runc and debootstrap"
fi
# crun refuses some hosts' cgroups; runc works. runc may not raise rlimits to the hard limit: stay below it.
NOFILE=$(ulimit -Hn); [ "$NOFILE" = unlimited ] && NOFILE=65536; [ "$NOFILE" -gt 65536 ] && NOFILE=65536
PODMAN=(podman --runtime runc)
RUNOPTS=(--rm --ulimit "nofile=$NOFILE:$NOFILE" --ulimit nproc=4096:4096)
PODMAN_VERSION=$(podman --version | awk '{print $3}')
"${PODMAN[@]}" info >/dev/null 2>&1 || skip "podman cannot run here: $(podman info 2>&1 | tail -1)"

# ------------------------------------------------------------------ 2. base image
if [ "${EPVS_CT_REBUILD_BASE:-0}" = 1 ] || ! podman image exists "$BASE"; then
  note "debootstrap bookworm (minbase + python3.11) into $WORK/rootfs"
  rm -rf "$WORK/rootfs"
  t0=$(date +%s)
  debootstrap --variant=minbase --include=python3.11,python3.11-venv,python3-venv,python-is-python3,ca-certificates \
    bookworm "$WORK/rootfs" http://deb.debian.org/debian >>"$LOG" 2>&1 || skip "debootstrap failed (see $LOG)"
  rm -rf "$WORK"/rootfs/var/cache/apt/archives/*.deb "$WORK"/rootfs/var/lib/apt/lists/*
  tar -C "$WORK/rootfs" -c . | podman import --change 'CMD ["python3"]' - "$BASE" >>"$LOG" 2>&1 \
    || skip "podman import of the base image failed"
  note "base image made in $(( $(date +%s) - t0 )) s"
fi
BASE_MB=$(( $(podman image inspect --format '{{.Size}}' "$BASE") / 1000000 ))

# ------------------------------------------------------------------ 3. build
# The host's pip settings become build arguments; local folders and the certificate are bind-mounted
# read-only for the build only (podman build -v), so nothing of them is in a layer.
BUILD_ARGS=(--build-arg "BASE_IMAGE=$BASE" --build-arg "TEMPLATEFLOW_FETCH=${EPVS_TEMPLATEFLOW_FETCH:-0}")
BUILD_ARGS+=(--build-arg "VERSION=$($PY -c 'import bids_app; print(bids_app.__version__)' 2>/dev/null || echo 0.1.0)")
MOUNTS=()
pipconf() { $PY -m pip config get "global.$1" 2>/dev/null || true; }
extra=$(pipconf extra-index-url); links=${PIP_FIND_LINKS:-$(pipconf find-links)}; cert=${PIP_CERT:-$(pipconf cert)}
index=${PIP_INDEX_URL:-$(pipconf index-url)}
# local folders are mounted under /mnt/pip in the build and the settings rewritten to point there
inside() {  # inside VAR KIND URL...: mount what each file:// or path needs; set VAR to the rewritten list
  local var=$1; shift
  local out=() u dir
  for u in "${@:2}"; do
    case "$u" in
      file://*|/*) dir=${u#file://}; [ "$1" = index ] && dir=$(dirname "$dir")  # an index's files lie beside simple/
                   [ -d "$dir" ] && MOUNTS+=(-v "$dir:/mnt/pip$dir:ro")
                   case "$u" in file://*) out+=("file:///mnt/pip${u#file://}");; *) out+=("/mnt/pip$u");; esac;;
      *) out+=("$u");;
    esac
  done
  printf -v "$var" '%s' "${out[*]}"
}
# shellcheck disable=SC2086
{ inside extra index $extra; inside links links $links; inside index index $index; }
[ -n "$extra" ] && BUILD_ARGS+=(--build-arg "PIP_EXTRA_INDEX_URL=$extra")
[ -n "$links" ] && BUILD_ARGS+=(--build-arg "PIP_FIND_LINKS=$links")
[ -n "$index" ] && BUILD_ARGS+=(--build-arg "PIP_INDEX_URL=$index")
if [ -n "$cert" ] && [ -f "$cert" ]; then
  MOUNTS+=(-v "$cert:/run/pip-cert.pem:ro"); BUILD_ARGS+=(--build-arg PIP_CERT=/run/pip-cert.pem)
fi
# torch: this host serves the +cpu wheel through its pip settings; elsewhere the PyTorch index (the default)
BUILD_ARGS+=(--build-arg "TORCH_INDEX_URL=${EPVS_TORCH_INDEX_URL:-${index:-https://pypi.org/simple}}")
note "podman build ${BUILD_ARGS[*]} ${MOUNTS[*]}"
t0=$(date +%s)
if "${PODMAN[@]}" build --network host --ulimit "nofile=$NOFILE:$NOFILE" --ulimit nproc=4096:4096 \
    "${MOUNTS[@]}" "${BUILD_ARGS[@]}" -t "$IMAGE" -f Dockerfile . >"$WORK/build.log" 2>&1; then
  BUILD_S=$(( $(date +%s) - t0 )); record "build" OK "${BUILD_S} s (log: \`$WORK/build.log\`)"
else
  BUILD_S=$(( $(date +%s) - t0 )); record "build" FAIL "after ${BUILD_S} s: $(tail -3 "$WORK/build.log" | tr '\n' ' ')"
  tail -40 "$WORK/build.log" >&2; exit 1
fi
SIZE_MB=$(( $(podman image inspect --format '{{.Size}}' "$IMAGE") / 1000000 ))
CLEANUP=$(sed -n '/site-packages before clean-up/,/site-packages after clean-up/p' "$WORK/build.log" \
          | grep -E '^[0-9]+[[:space:]]' | head -14 | awk '{printf "%s %s MB; ", $2, $1}')
AFTER_MB=$(grep -A1 'site-packages after clean-up' "$WORK/build.log" | tail -1 | awk '{print $1}')
leak=$(podman image inspect --format '{{json .Config.Env}}' "$IMAGE"; podman history --no-trunc "$IMAGE")
if echo "$leak" | grep -qE 'PIP_(CERT|FIND_LINKS|EXTRA_INDEX_URL|INDEX_URL|TRUSTED_HOST)|TORCH_INDEX_URL|/mnt/pip'; then
  record "no build argument in the final image" FAIL "found in its environment or history"
else
  record "no build argument in the final image" OK "Env and history hold no PIP_*/TORCH_INDEX_URL"
fi

# ------------------------------------------------------------------ 4. runs
run() { "${PODMAN[@]}" run "${RUNOPTS[@]}" "$@"; }
expect() {  # expect NAME CODE CMD...: run, compare the exit code
  local name=$1 code=$2; shift 2
  local out rc; out=$("$@" 2>&1); rc=$?
  echo "$out" >"$WORK/$(echo "$name" | tr -c 'a-zA-Z0-9' _).log"
  if [ "$rc" = "$code" ]; then record "$name" OK "exit $rc"; else
    record "$name" FAIL "exit $rc, expected $code: $(echo "$out" | tail -2 | tr '\n' ' ' | cut -c1-300)"; fi
  LAST_OUT=$out
}
du_image() { run --network none --entrypoint /bin/sh "$IMAGE" -c \
  'du -sm /opt/venv /opt/templateflow /usr 2>/dev/null; s=/opt/venv/lib/python3.11/site-packages; du -sm $s/* | sort -rn | head -8'; }
DU=$(du_image | awk '{printf "%s %s MB; ", $2, $1}')

expect "--help" 0 run --network none "$IMAGE" --help
expect "--version" 0 run --network none "$IMAGE" --version
VERSION_OUT=$(echo "$LAST_OUT" | tail -1)

D="$WORK/run"; rm -rf "$D"; mkdir -p "$D"
# a non-root caller (what a user is): its own folders, its own uid
CALLER=epvsct; id -u "$CALLER" >/dev/null 2>&1 || useradd --uid 2345 --user-group --no-create-home "$CALLER"
CUID=$(id -u "$CALLER"); CGID=$(id -g "$CALLER")
su -s /bin/sh "$CALLER" -c "test -x '$D'" \
  || record "the caller can enter $D" FAIL "EPVS_CT_WORK=$WORK lies in a folder uid $CUID cannot enter: choose one under /var/tmp"

# demo (the demo dataset is generated by the app itself inside the container)
mkdir -p "$D/demo"; chown "$CUID:$CGID" "$D/demo"
t0=$(date +%s)
expect "demo (--user caller, --read-only, --network none)" 0 run --network none --read-only --user "$CUID:$CGID" \
  -v "$D/demo:/out" "$IMAGE" demo /out/epvs-demo --participant-label sub-01
DEMO_S=$(( $(date +%s) - t0 ))

# the two-subject demo dataset (bids_app/demo.py: a real T2w shipped in the package, the ICBM152 T1w template)
$PY -c "import sys; from pathlib import Path; from bids_app.demo import build_demo_dataset as b; b(Path(sys.argv[1]))" \
  "$D/bids" >>"$LOG" 2>&1 || record "make the two-subject dataset" FAIL "bids_app.demo.build_demo_dataset failed"
chmod -R a+rX "$D/bids"
before=$(cd "$D/bids" && find . -type f -exec sha256sum {} + | sort | sha256sum)

# participant level as the image's default user (uid 1000) into folders it owns
mkdir -p "$D/out_default" "$D/work_default"; chown 1000:1000 "$D/out_default" "$D/work_default"
t0=$(date +%s)
expect "participant, default user (uid 1000), --read-only, --network none, input :ro" 0 \
  run --network none --read-only -v "$D/bids:/data:ro" -v "$D/out_default:/out" -v "$D/work_default:/work" \
  "$IMAGE" /data /out participant -w /work --participant-label 01 --skip-bids-validation
PART1_S=$(( $(date +%s) - t0 ))

# participant level as the caller with --user, both subjects, then the group level
mkdir -p "$D/out" "$D/work"; chown "$CUID:$CGID" "$D/out" "$D/work"
t0=$(date +%s)
expect "participant, --user caller, --read-only, --network none, 2 subjects" 0 \
  run --network none --read-only --user "$CUID:$CGID" -v "$D/bids:/data:ro" -v "$D/out:/out" -v "$D/work:/work" \
  "$IMAGE" /data /out participant -w /work
PART2_S=$(( $(date +%s) - t0 ))
expect "group, --user caller, --read-only, --network none" 0 \
  run --network none --read-only --user "$CUID:$CGID" -v "$D/bids:/data:ro" -v "$D/out:/out" -v "$D/work:/work" \
  "$IMAGE" /data /out group -w /work
n_html=$(ls "$D"/out/sub-*.html 2>/dev/null | wc -l)
owners=$(find "$D/out" "$D/work" ! -uid "$CUID" | wc -l)
n_group=$(find "$D/out" -maxdepth 2 -path '*group*' -type f | wc -l)
if [ "$n_html" = 2 ] && [ "$n_group" -gt 0 ]; then
  record "outputs of 2 subjects + group" OK "$n_html participant reports, $n_group group files"
else
  record "outputs of 2 subjects + group" FAIL "$n_html participant reports; $(ls "$D/out" | tr '\n' ' ')"
fi
[ "$owners" = 0 ] && record "outputs belong to the caller" OK "every file uid $CUID" \
  || record "outputs belong to the caller" FAIL "$owners files not owned by uid $CUID"
prov=$(ls "$D"/out/logs/*_provenance.json 2>/dev/null | head -1)
if [ -n "$prov" ] && $PY - "$prov" "$D/out/dataset_description.json" "$D"/out/sub-*.html <<'EOF'
import json, sys
p = json.load(open(sys.argv[1])); d = json.load(open(sys.argv[2]))
assert p["container"]["Type"] == "docker" and p["container"]["Tag"], p.get("container")
assert "synthesised" in p["template_image"] or "TemplateFlow" in p["template_image"], p.get("template_image")
assert d["GeneratedBy"][0]["Container"]["Type"] == "docker"
for html in sys.argv[3:]:
    text = open(html).read()
    assert "Container: docker image" in text and "Template image:" in text, html
print(p["container"], "|", p["template_image"])
EOF
then record "container and template provenance (JSON + report)" OK "$(basename "$prov")"
else record "container and template provenance (JSON + report)" FAIL "missing in $prov or the reports"; fi
after=$(cd "$D/bids" && find . -type f -exec sha256sum {} + | sort | sha256sum)
[ "$before" = "$after" ] && record "input unchanged" OK "sha256 of every input file identical" \
  || record "input unchanged" FAIL "the input changed"

# the README's container commands, as written, by the non-root caller in a fresh folder (docker -> podman)
readme_cmd=$($PY -c "import re; s = open('README.md').read().split('## Containers and clusters')[1].split('\n## ')[0]; \
print(re.findall(r'\`\`\`bash\n(.*?)\`\`\`', s, flags=re.S)[0])")
fresh="$D/readme"; mkdir -p "$fresh"; cp -r "$D/bids" "$fresh/bids"; chown -R "$CUID:$CGID" "$fresh"
cmd=${readme_cmd//docker run/podman --runtime runc run --ulimit nofile=$NOFILE:$NOFILE --ulimit nproc=4096:4096}
cmd=${cmd/ epvs-bids / $IMAGE }
echo "$cmd" >"$WORK/readme_command.sh"
# Lines other than the run line are run by the caller (mkdir makes folders the caller owns). The run line is
# run by root's podman, as a member of the docker group asks the root daemon: $(id -u), $(id -g) and $PWD are
# the caller's (rootless podman would need subuids and a second copy of the image).
prep=$(echo "$cmd" | grep -v 'podman ') ; runline=$(echo "$cmd" | grep 'podman ')
su -s /bin/bash "$CALLER" -c "cd '$fresh' && set -e && $prep" >>"$LOG" 2>&1
expect "README command as written (non-root caller, fresh folder)" 0 \
  bash -c "id() { command id \"\$@\" $CALLER; }; cd '$fresh' && $runline --participant-label 02"
[ -f "$fresh/derivatives/sub-02.html" ] && record "README command wrote sub-02's report" OK "derivatives/sub-02.html" \
  || record "README command wrote sub-02's report" FAIL "no derivatives/sub-02.html"
# Apptainer's way: an arbitrary uid, no HOME, read-only root filesystem
mkdir -p "$D/out_any" "$D/work_any"; chmod 777 "$D/out_any" "$D/work_any"
expect "arbitrary uid 4321, HOME unset, --read-only (Apptainer-like)" 0 \
  run --network none --read-only --user 4321:4321 --entrypoint /bin/sh \
  -v "$D/bids:/data:ro" -v "$D/out_any:/out" -v "$D/work_any:/work" "$IMAGE" \
  -c 'unset HOME; exec epvs-bids /data /out participant -w /work --participant-label 01 --skip-bids-validation'
# the error a user meets without --user: exit 73, naming the uid and the fix
mkdir -p "$D/out_root"; chmod 755 "$D/out_root"
expect "unwritable output: exit 73 with the uid and the fix" 73 \
  run --network none -v "$D/bids:/data:ro" -v "$D/out_root:/out" -v "$D/out_root:/work" "$IMAGE" /data /out participant -w /work
echo "$LAST_OUT" | grep -q 'uid 1000' && echo "$LAST_OUT" | grep -q -- '--user' \
  && record "exit-73 message names uid 1000 and --user" OK "$(echo "$LAST_OUT" | grep -m1 'not writable' | cut -c1-160)..." \
  || record "exit-73 message names uid 1000 and --user" FAIL "$(echo "$LAST_OUT" | tail -1)"
# CPU limits: one CPU by affinity, and a quota of 1 CPU
expect "--cpuset-cpus 0: the app sees 1 CPU" 0 run --network none --cpuset-cpus 0 --entrypoint python "$IMAGE" \
  -c 'from bids_app.environment import available_cpus as a; n = a(); print(n); assert n == 1, n'
expect "--cpus 1 (cgroup quota): the app sees 1 CPU" 0 run --network none --cpus 1 --entrypoint python "$IMAGE" \
  -c 'from bids_app.environment import available_cpus as a; n = a(); print(n); assert n == 1, n'

# ------------------------------------------------------------------ 5. record
{
  echo "# Container check ($(date -u +%Y-%m-%dT%H:%MZ))"
  echo
  echo "Command: \`sudo scripts/container_check.sh benchmarks/results/container.md\` (commit $(git rev-parse --short HEAD 2>/dev/null))."
  echo "Made by \`scripts/container_check.sh\` on $(. /etc/os-release; echo "$PRETTY_NAME"), $(nproc) CPUs,"
  echo "podman $PODMAN_VERSION with runc $(runc --version | head -1 | awk '{print $3}'), rootful."
  echo "Base image: \`$BASE\` made by debootstrap (bookworm minbase + python3.11), $BASE_MB MB."
  echo "Image: \`$IMAGE\` (\`$VERSION_OUT\`). Data: the demo dataset (\`bids_app/demo.py\`): sub-01 a real T2w"
  echo "(neurolabusc/Clinical, evaluation-only: only run, nothing tuned), sub-02 the ICBM152 2009a T1w template."
  echo
  echo "- build time: **$BUILD_S s** (2 shared cores; base image cached)"
  echo "- image size: **$SIZE_MB MB** (podman image inspect)"
  echo "- inside the image (du): $DU"
  echo "- site-packages before the clean-up stage step (du, MB): $CLEANUP"
  echo "- site-packages after the clean-up: ${AFTER_MB:-?} MB"
  echo "- run times: demo $DEMO_S s; participant (1 subject) $PART1_S s; participant (2 subjects) $PART2_S s"
  echo
  echo "| check | result | detail |"
  echo "| --- | --- | --- |"
  printf '%s\n' "${ROWS[@]}"
} >"$WORK/result.md"
cat "$WORK/result.md"
[ -n "$RESULT" ] && cp "$WORK/result.md" "$RESULT"
exit $FAILED
