#!/usr/bin/env bash
# Build the filch node image without a Docker engine or a registry (Debian 12, root):
#
#   1. base:  debootstrap a minimal bookworm rootfs (python3, etcd, runc, supervisor) into a
#             cache directory keyed by a hash of the recipe, and `podman import` it as
#             localhost/filch-base:<hash>. Both are reused when present, so only the first
#             run pays for debootstrap (~1 min).
#   2. node:  build the filch wheel and download its dependencies as wheels on this machine,
#             then `buildah bud` images/Containerfile FROM that base, offline, with layer
#             caching -> localhost/filch-node:<version> and localhost/filch-node:latest.
#
# Usage: images/build.sh          (or `make image`)
# Environment:
#   FILCH_IMAGE_CACHE=/var/cache/filch-image   where base rootfs trees and the lock live
#   FILCH_IMAGE_NAME=localhost/filch-node      repository of the result
#   FILCH_IMAGE_SOURCE=URL                     org.opencontainers.image.source (default: git origin)
#   FILCH_IMAGE_REFRESH=1                      rebuild the base and every layer from scratch
#   DEBIAN_MIRROR=http://deb.debian.org/debian
# Prints the image reference, build time and image size at the end.
set -euo pipefail
started=$(date +%s)
repo=$(cd "$(dirname "$0")/.." && pwd)
cache=${FILCH_IMAGE_CACHE:-/var/cache/filch-image}
name=${FILCH_IMAGE_NAME:-localhost/filch-node}
mirror=${DEBIAN_MIRROR:-http://deb.debian.org/debian}
refresh=${FILCH_IMAGE_REFRESH:-0}
python=$repo/.venv/bin/python

log() { printf '[build %3ss] %s\n' "$(($(date +%s) - started))" "$*" >&2; }
die() { printf 'images/build.sh: %s\n' "$*" >&2; exit 1; }

[[ $(id -u) == 0 ]] || die "needs root (debootstrap, podman storage); run it with sudo"
[[ -x $python ]] || die "$python is missing: run 'make venv' first"

# -- tools -----------------------------------------------------------------------------------
missing=()
for pair in podman=podman buildah=buildah debootstrap=debootstrap; do
  command -v "${pair%%=*}" >/dev/null || missing+=("${pair#*=}")
done
if ((${#missing[@]})); then
  log "installing ${missing[*]} (apt)"
  export DEBIAN_FRONTEND=noninteractive
  if ! find /var/lib/apt/lists -maxdepth 1 -name '*_Packages*' -mmin -60 | grep -q .; then
    apt-get update -qq
  fi
  apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
fi

# Rootful podman raises every container's nofile limit to 1048576 by default; this kind of
# machine's hard limit is lower, so every `podman run` and every RUN step of a build fails with
# "error setting rlimit type 7: operation not permitted". An empty default_ulimits makes
# containers inherit the caller's limits instead. Idempotent: the file is touched only when
# the key is absent; a value someone set on purpose is left alone (with a warning).
conf=/etc/containers/containers.conf
ulimits=$("$python" - "$conf" <<'PY'
import sys, tomllib
try:
    with open(sys.argv[1], "rb") as stream:
        data = tomllib.load(stream)
except FileNotFoundError:
    data = {}
except tomllib.TOMLDecodeError as error:
    sys.exit(f"{sys.argv[1]}: {error}")
print(data.get("containers", {}).get("default_ulimits", "unset"))
PY
) || die "cannot read $conf"
case $ulimits in
  "[]") ;;
  unset)
    log "setting default_ulimits = [] in $conf (podman's default nofile limit is refused here)"
    mkdir -p "$(dirname "$conf")"
    line="default_ulimits = []  # images/build.sh: inherit the caller's limits"
    if [[ -f $conf ]] && grep -q '^\[containers\][[:space:]]*$' "$conf"; then
      sed -i "/^\[containers\][[:space:]]*\$/a $line" "$conf"
    else
      printf '\n[containers]\n%s\n' "$line" >>"$conf"
    fi ;;
  *) log "WARNING: $conf sets default_ulimits = $ulimits; if containers fail with" \
       "'error setting rlimit', set it to []" ;;
esac

mkdir -p "$cache"
# One build at a time (the e2e test and `make image` may run together): both write the same
# base cache directory and image tags.
exec 9>"$cache/lock"
flock -w 1200 9 || die "another images/build.sh holds $cache/lock for 20 minutes"

# -- 1. the base rootfs and image --------------------------------------------------------------
# The hash covers everything that decides the rootfs's content; bump recipe= when the steps
# below change. The tree is a snapshot: Debian's security updates as of the day it was made
# (printed below); FILCH_IMAGE_REFRESH=1 makes a fresh one.
packages=python3,python3-venv,etcd-server,runc,supervisor,ca-certificates,iproute2,nftables
recipe="recipe=3 suite=bookworm variant=minbase arch=$(dpkg --print-architecture) mirror=$mirror include=$packages"
hash=$(printf '%s' "$recipe" | sha256sum | cut -c1-12)
rootfs=$cache/base-$hash
base=localhost/filch-base:$hash

if [[ $refresh == 1 ]]; then
  log "FILCH_IMAGE_REFRESH=1: dropping the cached base $hash"
  rm -rf --one-file-system "$rootfs"
  podman image rm -f "$base" >/dev/null 2>&1 || true
fi

make_base() {
  local tree=$rootfs.tmp
  log "debootstrap $packages -> $rootfs (about a minute)"
  umount "$tree/proc" 2>/dev/null || true  # left mounted by an interrupted run
  rm -rf --one-file-system "$tree"
  debootstrap --variant=minbase --include="$packages" bookworm "$tree" "$mirror" \
    >"$cache/debootstrap-$hash.log" 2>&1 \
    || { tail -20 "$cache/debootstrap-$hash.log" >&2; die "debootstrap failed (log: $cache/debootstrap-$hash.log)"; }
  # Release, updates and security suites, then the updates: done here rather than in a
  # Containerfile layer, which would carry every replaced file twice.
  rm -f "$tree/etc/apt/sources.list"
  cat >"$tree/etc/apt/sources.list.d/debian.sources" <<SRC
Types: deb
URIs: $mirror
Suites: bookworm bookworm-updates
Components: main
Signed-By: /usr/share/keyrings/debian-archive-keyring.gpg

Types: deb
URIs: ${mirror%/debian}/debian-security
Suites: bookworm-security
Components: main
Signed-By: /usr/share/keyrings/debian-archive-keyring.gpg
SRC
  # Nothing at run time reads docs, man pages or translations. Copyright files stay (license
  # notices); dpkg skips the rest for packages installed later, the updates below included.
  cat >"$tree/etc/dpkg/dpkg.cfg.d/filch-nodoc" <<'CFG'
path-exclude=/usr/share/doc/*
path-include=/usr/share/doc/*/copyright
path-exclude=/usr/share/man/*
path-exclude=/usr/share/info/*
path-exclude=/usr/share/locale/*
path-exclude=/usr/share/lintian/*
CFG
  log "applying bookworm-updates and bookworm-security in the new tree"
  mount -t proc proc "$tree/proc"
  local status=0
  chroot "$tree" /bin/sh -ec '
    export DEBIAN_FRONTEND=noninteractive
    apt-get update -qq
    apt-get -y -qq --no-install-recommends -o Dpkg::Use-Pty=0 dist-upgrade
    apt-get clean' >>"$cache/debootstrap-$hash.log" 2>&1 || status=$?
  umount "$tree/proc"
  ((status == 0)) || { tail -20 "$cache/debootstrap-$hash.log" >&2; die "apt-get dist-upgrade in $tree failed"; }
  (
    cd "$tree"
    rm -rf var/cache/apt/archives/*.deb var/cache/apt/*.bin var/lib/apt/lists/* \
      var/log/apt var/log/dpkg.log var/log/bootstrap.log var/log/alternatives.log \
      usr/share/man usr/share/info usr/share/locale usr/share/lintian
    find usr/share/doc -mindepth 1 -not -name copyright -not -type d -delete
    find usr/share/doc -mindepth 1 -type d -empty -delete
    # debootstrap copied this machine's resolver and name; the container runtime provides both.
    : >etc/resolv.conf
    echo localhost >etc/hostname
  )
  echo "$recipe made=$(date -u +%Y-%m-%dT%H:%M:%SZ)" >"$tree/.filch-base-complete"
  rm -rf "$rootfs"
  mv "$tree" "$rootfs"
}
[[ -f $rootfs/.filch-base-complete ]] || make_base
log "base $hash: $(sed 's/.*made=/security updates as of /' "$rootfs/.filch-base-complete")"

if ! podman image exists "$base"; then
  log "importing $rootfs as $base"
  tar --numeric-owner --xattrs -C "$rootfs" --exclude=./.filch-base-complete -c . \
    | podman import --quiet \
        --change 'CMD ["/bin/bash"]' \
        --message "debootstrap --variant=minbase --include=$packages bookworm ($hash)" \
        - "$base" >/dev/null
fi

# -- 2. the node image -------------------------------------------------------------------------
version=$(cd "$repo" && "$python" -c '
import tomllib; print(tomllib.load(open("pyproject.toml", "rb"))["project"]["version"])')
license=$(cd "$repo" && "$python" -c '
import tomllib
lic = tomllib.load(open("pyproject.toml", "rb"))["project"].get("license", "NOASSERTION")
print(lic if isinstance(lic, str) else lic.get("text", "NOASSERTION"))')
source_url=${FILCH_IMAGE_SOURCE:-$(git -C "$repo" remote get-url origin 2>/dev/null || echo "file://$repo")}
revision=$(git -C "$repo" rev-parse HEAD 2>/dev/null || echo unknown)

context=$(mktemp -d /var/tmp/filch-image.XXXXXX)
trap 'rm -rf "$context"' EXIT

# Build the wheel from a copy of the sources: building in the repository would write build/
# and *.egg-info there, under other people's feet. Uncommitted files are included on purpose.
log "building the filch $version wheel"
mkdir -p "$context/src" "$context/wheels/deps" "$context/wheels/filch"
for item in pyproject.toml setup.cfg setup.py MANIFEST.in README.md LICENSE LICENSE.txt COPYING node; do
  [[ -e $repo/$item ]] && cp -a "$repo/$item" "$context/src/"
done
find "$context/src" -name __pycache__ -type d -prune -exec rm -rf {} +
"$python" -m pip wheel --quiet --disable-pip-version-check --no-deps \
  -w "$context/wheels/filch" "$context/src"

# The dependencies as wheels for the image's interpreter (CPython 3.11, glibc 2.36, this
# machine's architecture), whatever Python this machine has: binary wheels only.
log "downloading dependency wheels"
"$python" -c '
import sys, tomllib
print("\n".join(tomllib.load(open(sys.argv[1], "rb"))["project"]["dependencies"]))
' "$repo/pyproject.toml" | sed 's/[[:space:]]*#.*//' >"$context/wheels/requirements.txt"
platforms=()
for tag in manylinux_2_36 manylinux_2_34 manylinux_2_28 manylinux_2_27 manylinux_2_24 \
           manylinux_2_17 manylinux2014 manylinux_2_12 manylinux2010 manylinux_2_5 manylinux1; do
  platforms+=(--platform "${tag}_$(uname -m)")
done
"$python" -m pip download --quiet --disable-pip-version-check --only-binary=:all: \
  --implementation cp --python-version 3.11 --abi cp311 --abi abi3 --abi none \
  "${platforms[@]}" --platform any \
  -d "$context/wheels/deps" -r "$context/wheels/requirements.txt"

cp "$repo/images/Containerfile" "$repo/images/supervisord.conf" "$repo/images/entrypoint.sh" \
  "$context/"

# --force-rm: no half-built working containers left behind when a step fails.
layers=(--layers --force-rm --format docker --network none --build-arg "BASE=$base")
[[ $refresh == 1 ]] && layers+=(--no-cache)
# The dependencies stage first, under a tag, so that it outlives the pruning below and the
# next build reuses it (the tag names the exact set of wheels).
deps_hash=$(cd "$context/wheels" && sha256sum requirements.txt deps/*.whl | sha256sum | cut -c1-12)
log "buildah bud --target deps -> $name-deps:$deps_hash"
buildah bud --quiet "${layers[@]}" --target deps \
  -f "$context/Containerfile" -t "$name-deps:$deps_hash" "$context" >/dev/null
log "buildah bud -> $name:$version"
# --format docker: the OCI image config has no HEALTHCHECK field (buildah would drop it).
# --network none: every input is in the context; a RUN step that reaches out is a bug.
buildah bud --quiet "${layers[@]}" \
  --build-arg "VERSION=$version" \
  --build-arg "CREATED=$(date -u +%Y-%m-%dT%H:%M:%SZ)" \
  --build-arg "SOURCE=$source_url" \
  --build-arg "REVISION=$revision" \
  --build-arg "LICENSES=$license" \
  -f "$context/Containerfile" -t "$name:$version" -t "$name:latest" "$context" >/dev/null
# Older dependency stages (another set of wheels) are untagged, so the prune takes them.
for tag in $(podman images --format '{{.Repository}}:{{.Tag}}' "$name-deps"); do
  [[ $tag == "$name-deps:$deps_hash" ]] || podman untag "$tag" >/dev/null 2>&1 || true
done

# Dangling (untagged, childless) images from this and earlier builds of this script: the
# previous :latest, intermediate steps, old dependency stages. Tagged images stay.
podman image prune -f --filter label=io.filch.built-by=images/build.sh >/dev/null
new_id=$(podman image inspect --format '{{.Id}}' "$name:$version")

size=$(podman image inspect --format '{{.Size}}' "$name:$version")
log "done"
printf 'image:      %s:%s (and :latest), id %.12s, from %s\n' "$name" "$version" "$new_id" "$base"
printf 'size:       %s MB\n' "$((size / 1000000))"
printf 'build time: %s s\n' "$(($(date +%s) - started))"
