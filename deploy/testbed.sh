#!/usr/bin/env bash
# Multi-host livemig testbed on one machine, with network namespaces.
#
#   deploy/testbed.sh up N [--rate 1gbit] [--prefix NAME] [--state-dir DIR] [--timeout S] [--insecure]
#   deploy/testbed.sh down   [--prefix NAME] [--state-dir DIR]
#   deploy/testbed.sh status [--prefix NAME] [--state-dir DIR]
#
# Topology (prefix P, default "tb"; root only):
#
#   netns lm-P-br:  bridge lmbr-P  -- lmv-P-1 ... lmv-P-N    (no address)
#                                       | veth        | veth
#   netns lm-P-h1:  eth0 198.18.0.1/24      ...   netns lm-P-hN: eth0 198.18.0.N/24
#
# The bridge lives in its own namespace, not in the root one: nothing of the
# testbed is visible to (or filtered by) the host's network stack and
# firewall, nothing can route out of it, two testbeds with different prefixes
# can run at once with the same addresses, and deleting the namespaces
# removes every link. The root namespace needs no route to 198.18.0.0/24: the
# CLI reaches each agent through its control socket, a Unix socket on the
# shared filesystem (<state dir>/hN.sock), e.g.
#
#   livemig --agent /run/livemig-testbed/tb/h1.sock vm create vm1 --memory 256M --workload hotset:ws=64M,rate=20000
#   livemig --agent /run/livemig-testbed/tb/h1.sock migrate vm1 --to 198.18.0.2:7700 --wait
#
# --rate R (tc syntax: 100mbit, 1gbit, 10gbit) adds a tbf qdisc to both ends
# of each host's veth: eth0 inside the host namespace shapes what the host
# sends, lmv-P-N in the bridge namespace shapes what it receives. tbf counts
# layer-2 bytes (Ethernet + IP + TCP headers), so TCP payload tops out near
# 1448/1514 = 95.6% of R at MTU 1500.
#
# Every agent runs as: ip netns exec lm-P-hN livemig agent --name hN
#   --listen 198.18.0.N:7700 --control <state>/hN.sock --data-dir <state>/hN
#   --shm-prefix livemig-tb-P   (its guests carry that prefix in their segment
#   name, hence on their command line; agent logs in <state>/hN.log)
#   --set security.ca_file=<state>/tls/hN/ca.crt (and cert_file, key_file).
#
# Mutual TLS is on, as in production: `up` makes a throwaway cluster CA in
# <state>/tls/ca (`livemig ca init`, which runs openssl) and a certificate per
# host (`livemig cert issue hN`); `down` deletes them with the state dir.
# --insecure runs the agents with security.mode = "insecure" instead (no TLS;
# for comparisons only).
#
# `down` removes every namespace, link, process (agents, then their guests:
# any process inside a testbed namespace or with the shm prefix on its command
# line) and /dev/shm segment of prefix P. It works after a failed or partial
# `up` and when nothing is up (idempotent); a failing `up` runs it itself.
#
# Environment: LIVEMIG (the livemig executable; default <repo>/.venv/bin/livemig,
# else livemig on PATH), LIVEMIG_TESTBED_STATE (default /run/livemig-testbed).
set -Eeuo pipefail
shopt -s nullglob

SELF=$(readlink -f "${BASH_SOURCE[0]}")
ROOT=$(dirname "$(dirname "$SELF")")
PORT=7700
NET=198.18.0
MAX_HOSTS=50

die() { echo "testbed: $*" >&2; exit 2; }
say() { echo "testbed: $*" >&2; }

usage() {
    sed -n '2,6p' "$SELF" | sed 's/^# \{0,1\}//' >&2
    exit 2
}

# ---- arguments --------------------------------------------------------------
CMD=${1:-}
[[ -n "$CMD" ]] || usage
shift
N=""
RATE=""
PREFIX=tb
STATE_ROOT=${LIVEMIG_TESTBED_STATE:-/run/livemig-testbed}
READY_TIMEOUT_S=30
INSECURE=""
if [[ "$CMD" == up ]]; then
    [[ $# -ge 1 ]] || usage
    N=$1
    shift
fi
while [[ $# -gt 0 ]]; do
    case "$1" in
        --rate) [[ $# -ge 2 ]] || usage; RATE=$2; shift 2 ;;
        --prefix) [[ $# -ge 2 ]] || usage; PREFIX=$2; shift 2 ;;
        --state-dir) [[ $# -ge 2 ]] || usage; STATE_ROOT=$2; shift 2 ;;
        --timeout) [[ $# -ge 2 ]] || usage; READY_TIMEOUT_S=$2; shift 2 ;;
        --insecure) INSECURE=1; shift ;;
        -h|--help) usage ;;
        *) die "unknown argument $1" ;;
    esac
done

# Names must fit IFNAMSIZ (15 chars): lmv-<8>-<2> = 15, lmbr-<8> = 13.
[[ "$PREFIX" =~ ^[a-z0-9]{1,8}$ ]] || die "--prefix: 1-8 of a-z 0-9 (interface names are at most 15 chars), got '$PREFIX'"
[[ "$READY_TIMEOUT_S" =~ ^[0-9]+$ ]] || die "--timeout: whole seconds"
STATE="$STATE_ROOT/$PREFIX"
NS_BR="lm-$PREFIX-br"
BRIDGE="lmbr-$PREFIX"
SHM_PREFIX="livemig-tb-$PREFIX"

ns_host() { echo "lm-$PREFIX-h$1"; }
veth_br() { echo "lmv-$PREFIX-$1"; }

find_livemig() {
    if [[ -n "${LIVEMIG:-}" ]]; then
        [[ -x "$LIVEMIG" ]] || die "LIVEMIG=$LIVEMIG is not executable"
        echo "$LIVEMIG"
    elif [[ -x "$ROOT/.venv/bin/livemig" ]]; then
        echo "$ROOT/.venv/bin/livemig"
    elif command -v livemig >/dev/null; then
        command -v livemig
    else
        die "no livemig executable: run 'make venv' or set LIVEMIG"
    fi
}

need_root() {
    [[ $(id -u) -eq 0 ]] || die "must run as root (network namespaces, veth, tc)"
    command -v ip >/dev/null || die "ip (iproute2) not found"
}

# Our namespaces, by name: lm-P-br and lm-P-h<digits> only.
our_namespaces() {
    ip netns list 2>/dev/null | awk '{print $1}' | grep -E "^lm-${PREFIX}-(br|h[0-9]+)$" || true
}

# Processes that belong to this testbed: inside one of its namespaces, or with
# the shm prefix as an argument (agents: --shm-prefix P) or as the start of
# one (guests: the segment name P.<agent>.<vm>.<id>). Exact matches only, so
# prefix "tb" never matches "tb2".
# True if PID's command line has an argument equal to the shm prefix (agents:
# --shm-prefix P) or, with "any", one starting with "P." (guests: the segment
# name P.<agent>.<vm>.<id>). Exact matches: prefix "tb" never matches "tb2".
cmdline_has_prefix() {
    local a args=()
    mapfile -d '' -t args 2>/dev/null < "/proc/$1/cmdline" || return 1
    for a in "${args[@]}"; do
        [[ "$a" == "$SHM_PREFIX" ]] && return 0
        [[ "${2:-}" == any && "$a" == "$SHM_PREFIX".* ]] && return 0
    done
    return 1
}

# Processes that belong to this testbed: inside one of its namespaces, or with
# the shm prefix on their command line (see cmdline_has_prefix).
our_pids() {
    local ns pid
    {
        for ns in $(our_namespaces); do
            ip netns pids "$ns" 2>/dev/null || true
        done
        for pid in /proc/[0-9]*; do
            pid=${pid#/proc/}
            [[ "$pid" == "$$" || "$pid" == "$BASHPID" ]] && continue
            if cmdline_has_prefix "$pid" any; then
                echo "$pid"
            fi
        done
    } | sort -un
}

# Running (not a zombie): state is the field after the last ")" in /proc/PID/stat.
running() {
    local stat
    stat=$(cat "/proc/$1/stat" 2>/dev/null) || return 1
    stat=${stat##*) }
    [[ "${stat:0:1}" != Z ]]
}

wait_gone() {  # wait_gone DEADLINE_S PID...: poll until none of the pids runs
    local deadline=$((SECONDS + $1)) p alive
    shift
    while :; do
        alive=""
        for p in "$@"; do
            if running "$p"; then
                alive="$alive $p"
            fi
        done
        [[ -z "$alive" ]] && return 0
        ((SECONDS < deadline)) || { echo "$alive"; return 1; }
        sleep 0.05
    done
}

# ---- down ---------------------------------------------------------------------
do_down() {
    local pids=() p f ns left
    # 1. agents we started: SIGTERM (graceful: they roll back migrations and
    #    leave their guests running, as in production), SIGKILL after 20 s.
    for f in "$STATE"/*.pid; do
        p=$(cat "$f" 2>/dev/null || true)
        [[ "$p" =~ ^[0-9]+$ ]] || continue
        # guard against pid reuse: it must still be one of ours
        if cmdline_has_prefix "$p"; then
            pids+=("$p")
        fi
    done
    if ((${#pids[@]})); then
        kill -TERM "${pids[@]}" 2>/dev/null || true
        if ! left=$(wait_gone 20 "${pids[@]}"); then
            say "agents did not stop within 20 s, killing:$left"
            # shellcheck disable=SC2086
            kill -KILL $left 2>/dev/null || true
        fi
    fi
    # 2. everything else of ours: guests (their own sessions), stragglers.
    local rounds=0
    while :; do
        mapfile -t pids < <(our_pids)
        ((${#pids[@]})) || break
        kill -KILL "${pids[@]}" 2>/dev/null || true
        wait_gone 10 "${pids[@]}" >/dev/null || true
        rounds=$((rounds + 1))
        ((rounds < 5)) || { say "processes survive SIGKILL: ${pids[*]}"; break; }
    done
    # 3. namespaces (their veths and the bridge go with them).
    for ns in $(our_namespaces); do
        ip netns del "$ns" 2>/dev/null || say "could not delete netns $ns"
    done
    # 4. links in the root namespace (none are created there; an interrupted
    #    older run or a manual experiment may have left some).
    for f in $(ip -o link show 2>/dev/null | awk -F': ' '{print $2}' | cut -d@ -f1 \
               | grep -E "^(lmv-${PREFIX}-[0-9]+|${BRIDGE})$" || true); do
        ip link del "$f" 2>/dev/null || true
    done
    # 5. shared-memory segments.
    rm -f /dev/shm/"$SHM_PREFIX".*
    # 6. the state dir (control sockets, data dirs, logs, pid files).
    if [[ -d "$STATE" ]]; then
        rm -rf -- "$STATE"
    fi
    rmdir "$STATE_ROOT" 2>/dev/null || true
    # 7. check
    local remain=""
    [[ -z "$(our_namespaces)" ]] || remain="$remain namespaces:$(our_namespaces | tr '\n' ' ')"
    [[ -z "$(our_pids)" ]] || remain="$remain processes:$(our_pids | tr '\n' ' ')"
    local segs=(/dev/shm/"$SHM_PREFIX".*)
    ((${#segs[@]} == 0)) || remain="$remain segments:${segs[*]}"
    if [[ -n "$remain" ]]; then
        say "down: left over:$remain"
        return 1
    fi
    say "down: testbed '$PREFIX' removed"
}

# ---- up -----------------------------------------------------------------------
rate_bytes_per_s() {  # tc rate syntax -> bytes/s (integer)
    local v u
    [[ "$1" =~ ^([0-9]+)(bit|kbit|mbit|gbit)$ ]] || die "--rate: a number with bit, kbit, mbit or gbit (e.g. 1gbit), got '$1'"
    v=${BASH_REMATCH[1]}
    u=${BASH_REMATCH[2]}
    case "$u" in
        bit) echo $((v / 8)) ;;
        kbit) echo $((v * 1000 / 8)) ;;
        mbit) echo $((v * 1000000 / 8)) ;;
        gbit) echo $((v * 1000000000 / 8)) ;;
    esac
}

shape() {  # shape NS DEV: tbf on DEV's egress inside NS
    # burst: 1 ms at the rate, at least 64 KiB so a full GSO packet (64 KiB)
    # passes without being split; latency bounds the queue.
    local bps burst
    bps=$(rate_bytes_per_s "$RATE")
    burst=$((bps / 1000))
    ((burst >= 65536)) || burst=65536
    ip netns exec "$1" tc qdisc replace dev "$2" root tbf rate "$RATE" burst "$burst" latency 20ms
}

on_up_error() {
    local rc=$? line=$1
    trap - ERR INT TERM
    set +e
    say "up failed (line $line, exit $rc); logs:"
    for f in "$STATE"/*.log; do
        echo "--- $f" >&2
        tail -n 20 "$f" >&2
    done
    say "cleaning up"
    do_down
    exit 1
}

do_up() {
    [[ "$N" =~ ^[0-9]+$ ]] && ((N >= 1 && N <= MAX_HOSTS)) || die "N: 1..$MAX_HOSTS hosts, got '$N'"
    [[ -z "$RATE" ]] || rate_bytes_per_s "$RATE" >/dev/null
    local livemig i ns sock
    livemig=$(find_livemig)
    if [[ -e "$STATE/meta" || -n "$(our_namespaces)" ]]; then
        die "testbed '$PREFIX' is already (partly) up: run '$0 down --prefix $PREFIX' first"
    fi
    trap 'on_up_error $LINENO' ERR
    trap 'on_up_error $LINENO' INT TERM
    mkdir -p "$STATE"
    chmod 0755 "$STATE_ROOT" "$STATE"
    {
        echo "prefix=$PREFIX"
        echo "hosts=$N"
        echo "rate=${RATE:-none}"
        echo "livemig=$livemig"
        echo "shm_prefix=$SHM_PREFIX"
        echo "security=$([[ -n "$INSECURE" ]] && echo insecure || echo tls)"
        echo "created=$(date -u +%FT%TZ)"
    } > "$STATE/meta"

    ip netns add "$NS_BR"
    ip -n "$NS_BR" link set lo up
    ip -n "$NS_BR" link add "$BRIDGE" type bridge
    ip -n "$NS_BR" link set "$BRIDGE" up
    for ((i = 1; i <= N; i++)); do
        ns=$(ns_host "$i")
        ip netns add "$ns"
        ip -n "$ns" link set lo up
        # created directly in the two namespaces: never visible in the root one
        ip link add "$(veth_br "$i")" netns "$NS_BR" type veth peer name eth0 netns "$ns"
        ip -n "$NS_BR" link set "$(veth_br "$i")" master "$BRIDGE" up
        ip -n "$ns" addr add "$NET.$i/24" dev eth0
        ip -n "$ns" link set eth0 up
        if [[ -n "$RATE" ]]; then
            shape "$ns" eth0                       # what host i sends
            shape "$NS_BR" "$(veth_br "$i")"       # what host i receives
        fi
    done
    local sec=()
    if [[ -z "$INSECURE" ]]; then
        "$livemig" ca init "$STATE/tls/ca" --name "livemig-testbed-$PREFIX" >/dev/null
    fi
    for ((i = 1; i <= N; i++)); do
        ns=$(ns_host "$i")
        mkdir -p "$STATE/h$i"
        if [[ -n "$INSECURE" ]]; then
            sec=(--set security.mode=insecure)
        else
            "$livemig" cert issue "h$i" --ca "$STATE/tls/ca" --out "$STATE/tls/h$i" >/dev/null
            sec=(--set security.mode=tls --set "security.ca_file=$STATE/tls/h$i/ca.crt"
                 --set "security.cert_file=$STATE/tls/h$i/host.crt" --set "security.key_file=$STATE/tls/h$i/host.key")
        fi
        # setsid: the agent (and its guests) must not get the terminal's
        # signals; bash without job control does not make it a group leader,
        # so setsid execs in place and $! is the agent's pid.
        ip netns exec "$ns" setsid "$livemig" agent --name "h$i" --listen "$NET.$i:$PORT" \
            --control "$STATE/h$i.sock" --data-dir "$STATE/h$i" --shm-prefix "$SHM_PREFIX" \
            --log-format json "${sec[@]}" </dev/null >>"$STATE/h$i.log" 2>&1 &
        echo $! > "$STATE/h$i.pid"
    done
    # readiness: each control socket answers `status` (poll, with a deadline)
    local deadline=$((SECONDS + READY_TIMEOUT_S)) pending st pid
    pending=$(seq 1 "$N")
    while [[ -n "$pending" ]]; do
        local still=""
        for i in $pending; do
            pid=$(cat "$STATE/h$i.pid")
            if ! running "$pid"; then
                say "agent h$i (pid $pid) exited"
                false
            fi
            if st=$("$livemig" --agent "$STATE/h$i.sock" status --json 2>/dev/null); then
                echo "$st" > "$STATE/h$i.status.json"
            else
                still="$still $i"
            fi
        done
        pending=$still
        [[ -z "$pending" ]] && break
        if ((SECONDS >= deadline)); then
            say "agents not ready within ${READY_TIMEOUT_S} s:$pending"
            false
        fi
        sleep 0.1
    done
    trap - ERR INT TERM
    for ((i = 1; i <= N; i++)); do
        echo "h$i $NET.$i:$PORT $STATE/h$i.sock pid $(cat "$STATE/h$i.pid") netns $(ns_host "$i")"
    done
    say "up: $N hosts, rate ${RATE:-unlimited}; e.g. $livemig --agent $STATE/h1.sock status"
}

# ---- status ---------------------------------------------------------------------
do_status() {
    local ns i f p
    if [[ ! -e "$STATE/meta" && -z "$(our_namespaces)" ]]; then
        echo "testbed '$PREFIX': down"
        return 3
    fi
    [[ -e "$STATE/meta" ]] && cat "$STATE/meta"
    local livemig
    livemig=$(find_livemig)
    for f in "$STATE"/h*.pid; do
        i=$(basename "$f" .pid)
        p=$(cat "$f")
        if kill -0 "$p" 2>/dev/null; then
            echo "$i: agent pid $p running, control $STATE/$i.sock"
            "$livemig" --agent "$STATE/$i.sock" status 2>&1 | sed 's/^/    /' || true
        else
            echo "$i: agent pid $p NOT running (log: $STATE/$i.log)"
        fi
    done
    for ns in $(our_namespaces); do
        echo "netns $ns:"
        ip -n "$ns" -br addr 2>/dev/null | sed 's/^/    /'
        ip netns exec "$ns" tc qdisc show 2>/dev/null | grep tbf | sed 's/^/    /' || true
    done
}

case "$CMD" in
    up) need_root; do_up ;;
    down) need_root; do_down ;;
    status) need_root; do_status ;;
    *) usage ;;
esac
