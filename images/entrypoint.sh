#!/bin/bash
# Entrypoint of the filch node image (/usr/local/bin/filch-entrypoint).
#
# Fills in the FILCH_* settings the operator did not give, from what the container can see,
# then execs the command (by default `supervisord -n`, which runs the agent and gunicorn):
#
#   FILCH_NAME             the container's hostname
#   FILCH_ADVERTISE        <container IP>:<port of FILCH_LISTEN>, when FILCH_LISTEN is a wildcard
#   FILCH_ETCD_PEER_URL    http(s)://<container IP>:2380 (embedded etcd member only;
#                          https:// with FILCH_TLS_CA)
#   FILCH_SERVER           the local agent (for gunicorn and `podman exec <c> filch ...`)
#   FILCH_CPUS/FILCH_MEMORY  the container's CPU quota / memory limit, when it has them
#   FILCH_EXECUTOR         never chosen here: runc (the agent's default) needs CAP_SYS_ADMIN;
#                          without it the entrypoint refuses to start unless the operator set
#                          FILCH_EXECUTOR=process (and, with TLS, FILCH_ALLOW_UNISOLATED_TASKS=1).
#                          With it, a read-only cgroupfs is remounted rw.
#
# The container IP is the first global IPv4 address (`hostname -I`); set FILCH_ADVERTISE
# and FILCH_ETCD_PEER_URL yourself behind NAT or with several networks.
#
# Two more modes, for the image's own use:
#   filch-entrypoint --healthcheck       the HEALTHCHECK: this node is registered in the cluster
#   filch-entrypoint --fatal-listener    supervisord's event listener that stops the container
#                                        when a program is FATAL (see supervisord.conf)
set -euo pipefail

say() { printf 'filch-entrypoint: %s\n' "$*" >&2; }

# The local agent's address, from FILCH_LISTEN (a wildcard means loopback).
local_server() {
  local listen=${FILCH_LISTEN:-0.0.0.0:7070} host
  host=${listen%:*}
  case $host in 0.0.0.0 | "[::]" | :: | "") host=127.0.0.1 ;; esac
  echo "$host:${listen##*:}"
}

# The CLI's and gunicorn's TLS settings follow the agent's (node certificates carry
# 127.0.0.1 and localhost, so the loopback address verifies).
client_tls() {
  if [[ -n ${FILCH_TLS_CA:-} ]]; then export FILCH_CA=${FILCH_CA:-$FILCH_TLS_CA}; fi
  if [[ -n ${FILCH_API_TOKEN_FILE:-} ]]; then
    export FILCH_TOKEN_FILE=${FILCH_TOKEN_FILE:-$FILCH_API_TOKEN_FILE}
  fi
}

if [[ ${1:-} == --healthcheck ]]; then
  # Runs with the container's configured environment only (not what main mode derives).
  # Healthy = the local agent answers, reads the node list from etcd (a member without quorum
  # fails here) and this node is in it (a fenced or unregistered node is not).
  export FILCH_SERVER=${FILCH_SERVER:-$(local_server)}
  client_tls
  name=${FILCH_NAME:-$(hostname)}
  nodes=$(/opt/filch/bin/filch --timeout 8 nodes -o json)  # says why on stderr when it fails
  exec /opt/filch/bin/python -c '
import json, sys
names = [node["name"] for node in json.load(sys.stdin)]
sys.exit(0 if sys.argv[1] in names else f"node {sys.argv[1]!r} is not registered: {names}")
' "$name" <<<"$nodes"
fi

if [[ ${1:-} == --fatal-listener ]]; then
  # supervisord's event listener protocol: READY, then a header line with len:N and N bytes
  # of payload per event, answered with RESULT 2\nOK.
  while printf 'READY\n' && read -r header; do
    len=${header##*len:}; len=${len%% *}
    payload=""
    ((len > 0)) && read -r -N "$len" payload
    printf 'RESULT 2\nOK'
    say "FATAL: ${payload%%$'\n'*}: supervisord gave up restarting it; stopping the node"
    kill -TERM "$(cat /run/supervisord.pid 2>/dev/null || echo 1)" 2>/dev/null || true
  done
  exit 0
fi

# -- where am I ---------------------------------------------------------------------------
ip=""
for address in $(hostname -I 2>/dev/null || true); do
  if [[ $address == *.* && $address != 127.* ]]; then ip=$address; break; fi
done
if [[ -z $ip ]]; then
  ip=127.0.0.1
  say "no global IPv4 address: advertising $ip (a one-node cluster; set FILCH_ADVERTISE)"
fi

export FILCH_NAME=${FILCH_NAME:-$(hostname)}
export FILCH_LISTEN=${FILCH_LISTEN:-0.0.0.0:7070}
case ${FILCH_LISTEN%:*} in
  0.0.0.0 | "[::]" | :: | "")
    export FILCH_ADVERTISE=${FILCH_ADVERTISE:-$ip:${FILCH_LISTEN##*:}} ;;
esac
if [[ -z ${FILCH_ETCD_ENDPOINT:-} && -z ${FILCH_ETCD_PEER_URL:-} ]]; then
  # With certificates peers talk mutual TLS (the agent refuses http:// peers then); etcd's
  # client URL needs nothing here: it defaults to https://127.0.0.1:2379 under TLS.
  scheme=http
  if [[ -n ${FILCH_TLS_CA:-} ]]; then scheme=https; fi
  export FILCH_ETCD_PEER_URL=$scheme://$ip:2380
fi
export FILCH_SERVER=${FILCH_SERVER:-$(local_server)}
client_tls
export FILCH_DATA_DIR=${FILCH_DATA_DIR:-/var/lib/filch}
mkdir -p "$FILCH_DATA_DIR"

# -- the container's own cgroup limits as the node's capacity ---------------------------------
# Controller paths from /proc/self/cgroup; the limit files are found either below the mounted
# hierarchy's root (a private cgroup namespace or an unprivileged v1 mount) or at that path.
cgroup_file() {  # cgroup_file CONTROLLER FILE -> prints the first existing path
  local controller=$1 file=$2 path mount dir
  if [[ -f /sys/fs/cgroup/cgroup.controllers ]]; then
    path=$(sed -n 's/^0:://p' /proc/self/cgroup); mount=/sys/fs/cgroup
  else
    path=$(awk -F: -v c="$controller" '{ n = split($2, a, ","); for (i = 1; i <= n; i++) if (a[i] == c) print $3 }' /proc/self/cgroup)
    mount=/sys/fs/cgroup/$controller
  fi
  for dir in "$mount$path" "$mount"; do
    [[ -f $dir/$file ]] && { echo "$dir/$file"; return; }
  done
}

if [[ -z ${FILCH_MEMORY:-} ]]; then
  limit=""
  if file=$(cgroup_file memory memory.max) && [[ -n $file ]]; then limit=$(<"$file")
  elif file=$(cgroup_file memory memory.limit_in_bytes) && [[ -n $file ]]; then limit=$(<"$file")
  fi
  total=$(($(awk '/^MemTotal:/ { print $2 }' /proc/meminfo) * 1024))
  if [[ $limit =~ ^[0-9]+$ ]] && ((limit < total)); then
    # Leave room for etcd, the agent and gunicorn: a quarter of the limit, at most 512 MiB.
    reserve=$((limit / 4 < 536870912 ? limit / 4 : 536870912))
    export FILCH_MEMORY=$((limit - reserve))
  fi
fi
if [[ -z ${FILCH_CPUS:-} ]]; then
  quota="" period=""
  if file=$(cgroup_file cpu cpu.max) && [[ -n $file ]]; then
    read -r quota period <"$file"
  elif file=$(cgroup_file cpu cpu.cfs_quota_us) && [[ -n $file ]]; then
    quota=$(<"$file"); period=$(<"${file%/*}/cpu.cfs_period_us")
  fi
  if [[ $quota =~ ^[0-9]+$ && $period =~ ^[0-9]+$ ]] && ((period > 0)); then
    export FILCH_CPUS=$(awk -v q="$quota" -v p="$period" 'BEGIN { printf "%.2f", q / p }')
  elif (($(nproc) < $(getconf _NPROCESSORS_ONLN))); then
    export FILCH_CPUS=$(nproc)  # a cpuset smaller than the machine
  fi
fi

# -- can runc work in here? -------------------------------------------------------------------
# runc needs CAP_SYS_ADMIN (mounts, namespaces) and a writable cgroupfs. Without --privileged,
# podman mounts the container's own cgroups read-only: with CAP_SYS_ADMIN we remount them
# read-write, which lets runc create task cgroups *below the container's own* (tasks stay
# inside the container's limits) and nothing else.
capeff=$(awk '/^CapEff:/ { print $2 }' /proc/self/status)
cap_sys_admin=$(((0x$capeff >> 21) & 1))
if [[ -f /sys/fs/cgroup/cgroup.controllers ]]; then
  cgroup_mounts=(/sys/fs/cgroup)
else
  mapfile -t cgroup_mounts < <(awk '$3 == "cgroup" { print $2 }' /proc/self/mounts)
fi
if [[ $cap_sys_admin == 1 ]]; then  # runc, and the process executor's task cgroups
  for mount in "${cgroup_mounts[@]}"; do
    [[ -w $mount ]] || mount -o remount,rw,bind "$mount" 2>/dev/null \
      || say "could not remount $mount read-write"
  done
  if [[ -f /sys/fs/cgroup/cgroup.controllers && -w /sys/fs/cgroup ]] \
     && [[ -z $(cat /sys/fs/cgroup/cgroup.subtree_control) ]]; then
    # cgroup v2 ("no internal processes"): controllers can be handed to task cgroups only
    # once no process lives in the container's root cgroup: move ours to a leaf first (the
    # recipe of Docker's docker-in-docker image). Verified on cgroup v1 hosts only.
    mkdir -p /sys/fs/cgroup/supervisor
    while read -r pid; do
      echo "$pid" >/sys/fs/cgroup/supervisor/cgroup.procs 2>/dev/null || true
    done </sys/fs/cgroup/cgroup.procs
    sed -e 's/ / +/g' -e 's/^/+/' /sys/fs/cgroup/cgroup.controllers \
      >/sys/fs/cgroup/cgroup.subtree_control 2>/dev/null \
      || say "could not enable cgroup controllers for tasks"
  fi
fi
# Fail closed: no weaker executor is picked here (the agent checks the same rule again:
# node/running/isolation.py). The process executor gives each task a cgroup where it can write one.
if [[ -f /sys/fs/cgroup/cgroup.controllers ]]; then cgroups=/sys/fs/cgroup
else cgroups=/sys/fs/cgroup/memory; fi
allowed=false
[[ ${FILCH_ALLOW_UNISOLATED_TASKS:-} =~ ^(1|true|yes|on)$ ]] && allowed=true
if [[ ${FILCH_EXECUTOR:-runc} == runc ]]; then
  if [[ $cap_sys_admin != 1 || ! -w $cgroups ]]; then
    say "refusing to start: runc cannot isolate tasks in this container: it needs"
    say "CAP_SYS_ADMIN and a writable $cgroups (podman run --cap-add SYS_ADMIN; see"
    say "images/README.md). To run tasks NOT isolated instead, set FILCH_EXECUTOR=process"
    say "and, with TLS or a read-only $cgroups, FILCH_ALLOW_UNISOLATED_TASKS=1 (UNSAFE)"
    exit 78  # EX_CONFIG
  fi
elif [[ ${FILCH_EXECUTOR} == process && $allowed == false ]]; then
  if [[ -n ${FILCH_TLS_CA:-} ]]; then
    say "refusing to start: FILCH_EXECUTOR=process with TLS gives tasks the container's"
    say "network (etcd, every node's API): set FILCH_ALLOW_UNISOLATED_TASKS=1 to accept (UNSAFE)"
    exit 78
  elif [[ ! -w $cgroups ]]; then
    say "refusing to start: FILCH_EXECUTOR=process cannot give each task a cgroup ($cgroups"
    say "is read-only), so setsid would escape a cancel: set FILCH_ALLOW_UNISOLATED_TASKS=1"
    say "to accept (UNSAFE), or give the container CAP_SYS_ADMIN and use runc"
    exit 78
  fi
fi

# -- the HTTP face ----------------------------------------------------------------------------
node_dir=$(echo /opt/filch/lib/python3*/site-packages/node)
export FILCH_GUNICORN_CONF=$node_dir/faces/gunicorn_conf.py
# gunicorn runs as filch-http (group filch) and cannot read the operator's files, which
# `filch certs` makes 0600 root: it gets copies of the token and the node's key, mode 0640
# root:filch, in /run/filch (also right when the originals are on a read-only mount).
# Never the etcd key (NAME-etcd.key, next to the node's; the agent reads it in place):
# etcd trusts only the etcd CA, so what gunicorn can read gets no access to etcd.
# Without a token it listens on the container's loopback only: nothing binds beyond
# loopback without one (gunicorn_conf.py refuses, and the container would stop).
if [[ -f $node_dir/faces/http.py && -f $FILCH_GUNICORN_CONF ]]; then
  export FILCH_HTTP_AUTOSTART=${FILCH_HTTP_AUTOSTART:-true}
  install -d -o filch-http -g filch-http -m 0700 /run/filch-http
  install -d -o root -g filch -m 0750 /run/filch
  if [[ -n ${FILCH_TOKEN_FILE:-} ]]; then
    install -o root -g filch -m 0640 "$FILCH_TOKEN_FILE" /run/filch/token
    export FILCH_TOKEN_FILE=/run/filch/token
    export FILCH_HTTP_LISTEN=${FILCH_HTTP_LISTEN:-0.0.0.0:8080}
  elif [[ -z ${FILCH_HTTP_LISTEN:-} ]]; then
    export FILCH_HTTP_LISTEN=127.0.0.1:8080
    say "no API token (FILCH_API_TOKEN_FILE): the HTTP face listens on $FILCH_HTTP_LISTEN only"
  fi
  if [[ -n ${FILCH_CA:-} ]]; then  # its directory may be 0700 root (`filch certs`)
    install -o root -g filch -m 0644 "$FILCH_CA" /run/filch/ca.crt
    export FILCH_CA=/run/filch/ca.crt
  fi
  if [[ -n ${FILCH_TLS_CERT:-} && -n ${FILCH_TLS_KEY:-} ]]; then
    install -o root -g filch -m 0644 "$FILCH_TLS_CERT" /run/filch/node.crt
    install -o root -g filch -m 0640 "$FILCH_TLS_KEY" /run/filch/node.key
    export FILCH_HTTP_CERT=/run/filch/node.crt FILCH_HTTP_KEY=/run/filch/node.key
  fi
else
  export FILCH_HTTP_AUTOSTART=false
  say "this filch has no node/faces/http.py or node/faces/gunicorn_conf.py: the HTTP face (:8080) is off"
fi

say "node $FILCH_NAME: API $FILCH_LISTEN (advertised ${FILCH_ADVERTISE:-$FILCH_LISTEN})," \
  "HTTP ${FILCH_HTTP_LISTEN:-off}," \
  "etcd ${FILCH_ETCD_ENDPOINT:-peer $FILCH_ETCD_PEER_URL}," \
  "executor ${FILCH_EXECUTOR:-runc}, data $FILCH_DATA_DIR"

exec "$@"
