#!/usr/bin/env bash
# Load benchmark of the meshward sidecar proxy, on one machine: over loopback,
# and between network namespaces in explicit and transparent mode.
#
#   bench/proxy-load.sh            # builds $CARGO_TARGET_DIR (default target)/release/meshward if missing
#   MESHWARD=/path/to/meshward bench/proxy-load.sh
#
# Scenarios, each driven by the same wrk command
# (wrk -t$THREADS -c$CONNECTIONS -d$DURATION --latency, after a $WARMUP warm-up),
# every request carrying the same `Authorization: Bearer <JWT>` header:
#
#   direct          wrk -> nginx
#   meshward-l4     wrk -> meshward (outbound, tcp) -mTLS-> meshward (inbound, tcp) -> nginx
#   meshward-l7     same with protocol=http on both sides; the server side verifies
#                   the JWT (RS256) and authorizes every request (STRICT mTLS,
#                   RequestAuthentication, DENY without a request principal,
#                   ALLOW principal + GET + /bench/*)
#   meshward-l7-nojwt  meshward-l7 without the JWT rules (STRICT mTLS and the ALLOW
#                   only): the difference is what verifying the JWT costs
#   meshward-l7-log the same as meshward-l7 with access logs on (to files); skip
#                   with ACCESS_LOG_RUN=0. All other meshward runs use
#                   --access-log off --audit-log off.
#   haproxy-tcp     wrk -> haproxy A (mode tcp) -mTLS-> haproxy B (mode tcp) -> nginx
#   haproxy-http    the same in mode http (keep-alive, pooled server connections)
#   relay-tcp       the floor: haproxy A (mode tcp) -plaintext-> haproxy B (mode tcp)
#                   -> nginx, no TLS at all: what merely relaying bytes through two
#                   processes costs on this machine
#
# Fixed rate (Istio's yardstick; RATE_RUN=1): after the saturation run of
# meshward-l4, meshward-l7, meshward-l7-nojwt, haproxy-tcp, haproxy-http and
# relay-tcp, the same pair again under h2load --h1 holding RATE requests per
# second (RATE_CLIENTS connections at RATE/RATE_CLIENTS each) for RATE_DURATION
# seconds, every response 1 KiB (nginx's /bench/1k): each hop's vCPU (CPU-seconds
# per second) and RSS at that rate, as Istio reports a sidecar's cost per
# 1,000 requests per second.
#   meshward-gateway   wrk -HTTPS-> meshward gateway (configured by meshward server:
#                   Gateway, VirtualService, the server hop's WorkloadEntry and
#                   ServiceEntry) -mTLS-> meshward (inbound, http; STRICT, ALLOW the
#                   gateway's principal) -> nginx
#   haproxy-gateway wrk -HTTPS-> haproxy G (mode http, the same certificate,
#                   versions and suites) -mTLS-> haproxy B (mode http) -> nginx
#                   The number to compare is the gateway hop's CPU per request.
#
# Scenarios in network namespaces (root only; skipped with a message
# otherwise), all configured by one `meshward server` in a namespace of its
# own, so explicit and transparent mode differ in capture alone:
#
#   ns-direct         wrk (client namespace) -> nginx (server namespace), no proxy
#   ns-explicit-l4    wrk -> 127.0.0.1:18081, the client proxy's --upstream
#                     (endpoints and the server's identity from the control plane)
#                     -mTLS-> the server proxy's --inbound 18080 -> nginx
#   ns-explicit-l7    the same with protocol=http and meshward-l7's policies
#                     (STRICT, JWT, DENY without a request principal, ALLOW)
#   ns-transparent-l4 both proxies with --capture --proxy-mark 1337: wrk calls the
#                     ServiceEntry's address 240.240.0.10:8080; capture sends it to the
#                     client proxy (15001), which routes it by its original destination
#                     -mTLS-> nginx's own address 198.18.0.3:8080, captured by the server
#                     proxy (15006), which forwards it to nginx from 127.0.0.6
#   ns-transparent-l7 the same with the HTTP port and meshward-l7's policies
#   ns-*-paced        each of the above again, paced (NS_PACE_MS below)
#
# Both modes' proxies run with the same flags (--control-plane, --workload,
# --proxy-mark 1337, logs off) apart from the mode's own (--upstream/--inbound,
# or --capture). The report adds "capture cost": for each hop, transparent
# minus explicit CPU per request, against the budget of 2 us per request per hop.
# Topology (as crates/meshward/tests/common/netns.rs): a hub namespace whose
# bridge br0 holds 198.18.0.254/24 and forwards nothing, hosts cp (.1), client
# (.2) and server (.3) on veth pairs made between namespaces (never in the root
# namespace), named mwbench<PID>-*; each host routes 240.240.0.0/16 to the hub
# and has its own /etc/netns/<NAME>/resolv.conf. All of it is removed on exit.
#
# haproxy's certificates are issued by the same meshward CA (`meshward ca issue`).
# Reported per scenario: requests/s, p50 and p99 latency (and their ratios to
# direct), and for each proxy process ("hop"): CPU-seconds (utime+stime from
# /proc/PID/stat) spent during the measured phase per 1,000 requests, and VmRSS
# when idle (before any load) and at the end of the load. Progress goes to
# stderr; the tables (plain and markdown, for BENCHMARKS.md) to stdout.
#
# The loopback scenarios listen on 127.0.0.1, on free ports picked at start;
# the ns-* ones on fixed ports inside the script's own namespaces, and send
# nothing from the root namespace. Every process the script starts is stopped
# on exit. A non-2xx response or a socket error
# under load fails the run (exit 1) and prints the logs.
#
# Settings (environment): DURATION=8s WARMUP=2s CONNECTIONS=32 THREADS=1
# PROFILE=DIR (record each hop with `perf record -g` during the load and write
# its flat and by-caller profiles to DIR; the CPU numbers of such a run include
# perf's own cost), PROFILE_HZ=999, PROFILE_TOP=40,
# ACCESS_LOG_RUN=1 KEEP=0 (1 keeps the work directory with logs and configs),
# NS_ROUNDS=1 (measure each ns-* explicit/transparent pair that many times in
# turn: a capture cost per round, and their median), NS_PACE_MS=8 (after each
# ns-* scenario, its "-paced" twin: the same processes under wrk with every
# connection waiting NS_PACE_MS ms after each response (wrk's delay()), so
# both modes carry about the same request rate, CONNECTIONS x 1000 / (NS_PACE_MS
# + latency) per second, below saturation: there the CPU per request does not
# depend on how many requests each wake-up happens to batch, which it does at
# saturation, where a costlier path means less batching and so a costlier
# request again; 0 turns the paced runs off),
# QUIET_WAIT=60 (seconds to wait, at start and before the ns-* scenarios, for the
# machine to be under 10% busy),
# ONLY="meshward-l4 meshward-l7 meshward-l7-nojwt meshward-l7-log haproxy-tcp haproxy-http
# ns-explicit-l4 ns-transparent-l4 ns-explicit-l7 ns-transparent-l7" (a subset runs only
# those, after direct, and ns-direct before any ns-*).
# Needs: wrk, haproxy, nginx, curl, openssl, ss, column, ps, and for ns-*: ip, iptables, nft
# (installed with apt-get when missing; sudo is used when not root).

set -euo pipefail
shopt -u patsub_replacement 2>/dev/null || true

BENCH_DIR=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
REPO=$(cd "$BENCH_DIR/.." && pwd)
TEMPLATES=$BENCH_DIR/templates
KEYS=$REPO/crates/policy/tests/keys

DURATION=${DURATION:-8s}
WARMUP=${WARMUP:-2s}
CONNECTIONS=${CONNECTIONS:-32}
THREADS=${THREADS:-1}
ACCESS_LOG_RUN=${ACCESS_LOG_RUN:-1}
RATE_RUN=${RATE_RUN:-1}         # the fixed-rate (Istio yardstick) runs after each pair's saturation run
RATE=${RATE:-1000}              # requests per second, in total, of the fixed-rate runs
RATE_CLIENTS=${RATE_CLIENTS:-10}
RATE_DURATION=${RATE_DURATION:-6}
PROFILE=${PROFILE:-}           # a directory: profile each hop with perf during the load (skews its CPU numbers)
PROFILE_HZ=${PROFILE_HZ:-999}
PROFILE_TOP=${PROFILE_TOP:-40}
PROFILE_SYSCALLS=${PROFILE_SYSCALLS:-syscalls:sys_enter_read,syscalls:sys_enter_readv,syscalls:sys_enter_recvfrom,syscalls:sys_enter_write,syscalls:sys_enter_writev,syscalls:sys_enter_sendto,syscalls:sys_enter_sendmsg,syscalls:sys_enter_epoll_wait,syscalls:sys_enter_futex}
KEEP=${KEEP:-0}
QUIET_WAIT=${QUIET_WAIT:-60}   # seconds to wait for the machine to be < 10% busy
NS_ROUNDS=${NS_ROUNDS:-1}      # how many times each ns-* explicit/transparent pair is measured
NS_PACE_MS=${NS_PACE_MS:-8}    # paced ns-* runs: each connection waits this long after a response (0: none)
# Which scenarios after direct (always run: the ratios are to it).
ONLY=${ONLY:-meshward-l4 meshward-l7 meshward-l7-nojwt meshward-l7-log haproxy-tcp haproxy-http relay-tcp meshward-gateway haproxy-gateway ns-explicit-l4 ns-transparent-l4 ns-explicit-l7 ns-transparent-l7}

NS=bench
TD=cluster.local
CLIENT_ID=spiffe://$TD/ns/$NS/sa/client
SERVER_ID=spiffe://$TD/ns/$NS/sa/server
CA_SERVER_NAME=istiod.istio-system.svc   # a DNS name in meshward server's certificate
PATH_OK=/bench/ok
PATH_1K=/bench/1k   # 1 KiB answers, for the fixed-rate runs

log() { printf '[bench %s] %s\n' "$(date +%T)" "$*" >&2; }
die() {
    log "FAIL: $*"
    exit 1
}

NOTES=()
wanted() { [[ " $ONLY " == *" $1 "* ]]; }
# The namespaced scenarios need root: network namespaces, and iptables in them.
NS_WANTED=0
for s in ns-explicit-l4 ns-transparent-l4 ns-explicit-l7 ns-transparent-l7; do
    if wanted "$s"; then NS_WANTED=1; fi
done
if ((NS_WANTED)) && [[ $(id -u) -ne 0 ]]; then
    log "skipping the ns-* scenarios: they need root (network namespaces, and iptables inside them); run as root to include them"
    NOTES+=("ns-* scenarios skipped: not run as root.")
    NS_WANTED=0
fi

# --- tools -------------------------------------------------------------------

SUDO=
[[ $(id -u) -eq 0 ]] || SUDO=sudo

find_tool() { # name -> path or empty
    command -v "$1" 2>/dev/null || { [[ -x /usr/sbin/$1 ]] && echo "/usr/sbin/$1"; } || true
}

install_missing() {
    local missing=()
    [[ -n $(find_tool wrk) ]] || missing+=(wrk)
    [[ -n $(find_tool haproxy) ]] || missing+=(haproxy)
    [[ -n $(find_tool curl) ]] || missing+=(curl)
    [[ -n $(find_tool openssl) ]] || missing+=(openssl)
    [[ -n $(find_tool ss) ]] || missing+=(iproute2)
    [[ -n $(find_tool nginx) ]] || missing+=(nginx)
    [[ -n $(find_tool column) ]] || missing+=(bsdextrautils)
    [[ -n $(find_tool ps) ]] || missing+=(procps)
    if ((RATE_RUN)); then [[ -n $(find_tool h2load) ]] || missing+=(nghttp2-client); fi
    if ((NS_WANTED)); then
        [[ -n $(find_tool ip) ]] || missing+=(iproute2)
        [[ -n $(find_tool iptables) ]] || missing+=(iptables)
        [[ -n $(find_tool nft) ]] || missing+=(nftables)
    fi
    ((${#missing[@]})) || return 0
    log "installing: ${missing[*]}"
    $SUDO apt-get update -qq
    local pkgs=() p
    for p in "${missing[@]}"; do
        # nginx-light where the release has it (bookworm), else nginx.
        if [[ $p == nginx ]] && apt-cache policy nginx-light 2>/dev/null | grep -q 'Candidate: [0-9]'; then
            p=nginx-light
        fi
        pkgs+=("$p")
    done
    $SUDO env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends "${pkgs[@]}" >&2
}

install_missing
WRK=$(find_tool wrk)
HAPROXY=$(find_tool haproxy)
NGINX=$(find_tool nginx)
H2LOAD=$(find_tool h2load)
for t in WRK HAPROXY NGINX; do [[ -n ${!t} ]] || die "${t,,} not found after install"; done

if [[ -z ${MESHWARD:-} ]]; then
    MESHWARD=${CARGO_TARGET_DIR:-$REPO/target}/release/meshward
    if [[ ! -x $MESHWARD ]]; then
        log "building $MESHWARD"
        (cd "$REPO" && nice -n 19 cargo build --release -p meshward >&2)
    fi
fi
[[ -x $MESHWARD ]] || die "MESHWARD=$MESHWARD is not an executable"

CLK_TCK=$(getconf CLK_TCK)

# --- processes -----------------------------------------------------------------

NS_NGINX_PID= NS_NGINX_WORKERS= NS_CP_PID=
WORK=$(mktemp -d "${TMPDIR:-/tmp}/meshward-bench.XXXXXX")
PIDS=()
LAST_PID=

proc_alive() { # pid: running and not a zombie
    local s
    s=$(cat "/proc/$1/stat" 2>/dev/null) || return 1
    s=${s##*) }
    [[ ${s:0:1} != Z ]]
}

start_bg() { # name cmd... ; sets LAST_PID; output to $WORK/name.log
    local name=$1
    shift
    "$@" >"$WORK/$name.log" 2>&1 &
    LAST_PID=$!
    PIDS+=("$LAST_PID")
}

stop_pid() {
    local pid=$1 kids i
    proc_alive "$pid" || { wait "$pid" 2>/dev/null || true; return 0; }
    kids=$(ps -o pid= --ppid "$pid" 2>/dev/null || true)
    kill -TERM "$pid" 2>/dev/null || true
    for ((i = 0; i < 100; i++)); do
        proc_alive "$pid" || break
        sleep 0.1
    done
    kill -KILL "$pid" 2>/dev/null || true
    wait "$pid" 2>/dev/null || true
    for i in $kids; do
        proc_alive "$i" && kill -KILL "$i" 2>/dev/null || true
    done
}

# The network namespaces made so far (each recorded before it is made, so a
# half-made one goes too).
NETNS_MADE=()

# Kills what still runs in our namespaces (SIGKILL, bounded), then deletes
# them and their /etc/netns directories. Processes were stopped gently first.
ns_teardown() {
    local ns pids i
    ((${#NETNS_MADE[@]})) || return 0
    for ((i = 0; i < 50; i++)); do
        pids=$(for ns in "${NETNS_MADE[@]}"; do ip netns pids "$ns" 2>/dev/null; done)
        [[ -n $pids ]] || break
        # shellcheck disable=SC2086 # a list of pids
        kill -KILL $pids 2>/dev/null
        sleep 0.1
    done
    for ns in "${NETNS_MADE[@]}"; do
        [[ -n $ns ]] || continue
        ip netns del "$ns" 2>/dev/null
        rm -rf "/etc/netns/$ns"
    done
    NETNS_MADE=()
}

cleanup() {
    local rc=$? i
    set +e
    trap - EXIT INT TERM
    for ((i = ${#PIDS[@]} - 1; i >= 0; i--)); do
        stop_pid "${PIDS[i]}"
    done
    ns_teardown
    if ((rc != 0)); then
        log "exit $rc; logs in $WORK:"
        for f in "$WORK"/*.log; do
            [[ -s $f ]] || continue
            printf -- '--- %s (last 20 lines)\n' "$f" >&2
            tail -n 20 "$f" >&2
        done
        log "work directory kept: $WORK"
    elif [[ $KEEP == 1 ]]; then
        log "work directory kept: $WORK"
    else
        rm -rf "$WORK"
    fi
    exit "$rc"
}
trap cleanup EXIT
trap 'exit 130' INT
trap 'exit 143' TERM

# Free ports outside the ephemeral range (so wrk's and the proxies' own
# outgoing connections cannot take them between now and the bind).
pick_ports() { # count -> space-separated ports
    local n=$1 used p out=() tries=0
    used=" $(ss -Htan | awk '{n=split($4,a,":"); print a[n]}' | sort -u | tr '\n' ' ') "
    while ((${#out[@]} < n)); do
        ((tries++ < 10000)) || die "no free ports"
        p=$((20000 + RANDOM % 12000))
        [[ $used == *" $p "* ]] && continue
        used+="$p "
        out+=("$p")
    done
    echo "${out[*]}"
}

wait_until() { # description timeout_s pid command... (pid: fail at once if it exits)
    local what=$1 timeout=$2 pid=$3 i
    shift 3
    for ((i = 0; i < timeout * 10; i++)); do
        "$@" >/dev/null 2>&1 && return 0
        proc_alive "$pid" || die "$what: process $pid exited"
        sleep 0.1
    done
    die "timed out after ${timeout}s waiting for $what"
}

port_open() { (exec 3<>"/dev/tcp/127.0.0.1/$1") 2>/dev/null; }
http_ok() { [[ $(curl -s -o /dev/null -w '%{http_code}' --max-time 2 "$1") == 200 ]]; }
https_ok() { [[ $(curl -sk -o /dev/null -w '%{http_code}' --max-time 2 "$1") == 200 ]]; }

# run_in NS cmd...: in network namespace NS, or here when NS is empty.
run_in() {
    local ns=$1
    shift
    if [[ -n $ns ]]; then ip netns exec "$ns" "$@"; else "$@"; fi
}
# Where the load's client (wrk, and curl's checks) runs: the root namespace
# (loopback scenarios) or the ns-* scenarios' client namespace.
CLIENT_NS=
client_run() { run_in "$CLIENT_NS" "$@"; }

render() { # template out KEY=VALUE...
    local text kv
    text=$(<"$1")
    shift
    local dest=$1
    shift
    for kv in "$@"; do
        text=${text//@${kv%%=*}@/${kv#*=}}
    done
    [[ $text != *@[A-Z_]*@* ]] || die "unrendered placeholder in $dest"
    printf '%s\n' "$text" >"$dest"
}

# --- measurement ---------------------------------------------------------------

cpu_ticks() { # pid -> utime+stime (whole process, all threads)
    local s f
    s=$(<"/proc/$1/stat")
    s=${s##*) }
    read -r -a f <<<"$s"
    echo $((f[11] + f[12]))
}

sys_ticks() { # pid -> stime: the part of cpu_ticks spent in the kernel
    local s f
    s=$(<"/proc/$1/stat")
    s=${s##*) }
    read -r -a f <<<"$s"
    echo $((f[12]))
}

# The machine's busy and total ticks since boot (busy includes interrupts and
# hypervisor steal).
machine_ticks() {
    local a
    read -r -a a < <(head -1 /proc/stat)
    echo "$((a[1] + a[2] + a[3] + a[6] + a[7] + a[8])) $((a[1] + a[2] + a[3] + a[4] + a[5] + a[6] + a[7] + a[8]))"
}

# CPU ticks of this shell's reaped children (wrk, once it has exited), into
# CHILD_TICKS: `times` must run in this shell, not in a $(...) subshell.
children_ticks() {
    times >"$WORK/times.txt"
    CHILD_TICKS=$(tail -n 1 "$WORK/times.txt" | awk -v hz="$CLK_TCK" '{
        n = 0
        for (i = 1; i <= 2; i++) { split($i, p, "m"); sub(/s$/, "", p[2]); n += p[1] * 60 + p[2] }
        printf "%.0f", n * hz }')
}

# Ticks of the long-running processes of ours that are not measured hops:
# nginx (master and workers) and meshward server.
base_ticks() {
    local pid n=0
    for pid in $NGINX_PID $NGINX_WORKERS $CA_PID $NS_NGINX_PID $NS_NGINX_WORKERS $NS_CP_PID; do
        proc_alive "$pid" && n=$((n + $(cpu_ticks "$pid")))
    done
    echo "$n"
}

rss_kib() { awk '/^VmRSS:/{print $2}' "/proc/$1/status"; }
anon_kib() { awk '/^RssAnon:/{print $2}' "/proc/$1/status"; }
mib() { awk -v k="$1" 'BEGIN { printf "%.1f", k / 1024 }'; }

to_ms() { # wrk duration (12.3us, 4.5ms, 1.2s, 1.0m) -> ms
    awk -v v="$1" 'BEGIN {
        if (v ~ /us$/) { sub(/us$/, "", v); printf "%.3f", v / 1000 }
        else if (v ~ /ms$/) { sub(/ms$/, "", v); printf "%.3f", v }
        else if (v ~ /m$/) { sub(/m$/, "", v); printf "%.3f", v * 60000 }
        else if (v ~ /s$/) { sub(/s$/, "", v); printf "%.3f", v * 1000 }
        else { printf "nan" } }'
}

WRK_EXTRA=() # more wrk arguments (the paced scenarios' script)
run_wrk() { # url duration out
    client_run "$WRK" -t"$THREADS" -c"$CONNECTIONS" -d"$2" --latency "${WRK_EXTRA[@]}" \
        -H "Authorization: Bearer $JWT" "$1" >"$3" 2>&1 || die "wrk failed: $(cat "$3")"
}

check_wrk() { # scenario file: fail on non-2xx or socket errors
    local bad
    bad=$(grep -E 'Non-2xx|Socket errors' "$2" || true)
    if [[ -n $bad ]]; then
        log "$1: wrk reported errors:"
        cat "$2" >&2
        die "$1: $bad"
    fi
    grep -q '^Requests/sec:' "$2" || die "$1: unexpected wrk output: $(cat "$2")"
}

expect_status() { # scenario want(code, or !200) description curl-args...
    local scen=$1 want=$2 what=$3 got
    shift 3
    got=$(client_run curl -s -o /dev/null -w '%{http_code}' --max-time 3 "$@" || true)
    if [[ $want == '!200' ]]; then
        [[ $got != 200 ]] || die "$scen sanity check: $what: HTTP $got, wanted a refusal"
    else
        [[ $got == "$want" ]] || die "$scen sanity check: $what: HTTP $got, wanted $want"
    fi
    [[ $got == 000 ]] && got="000 (no HTTP answer: refused or closed)"
    log "  ok: $what -> $got"
}

declare -A R_RPS R_P50 R_P99 R_REQS R_HOPS R_OTHER R_WRK
SCENARIOS=()

# With PROFILE=DIR: each hop's flat profile (self time by symbol, the top
# PROFILE_TOP) and its profile by caller (children included) into DIR.
profile_report() { # scenario hop_name=pid...
    local scen=$1 hop name
    shift
    mkdir -p "$PROFILE"
    for hop in "$@"; do
        name=${hop%%=*}
        perf report -i "$WORK/perf-$scen-$name.data" --no-children --sort symbol --percent-limit 0.7 --stdio -g none 2>/dev/null \
            | grep -v '^#' | grep -v '^$' | head -n "$PROFILE_TOP" >"$PROFILE/$scen-$name.self.txt" || true
        perf report -i "$WORK/perf-$scen-$name.data" --children --sort symbol --percent-limit 3 --stdio -g none 2>/dev/null \
            | grep -v '^#' | grep -v '^$' | head -n "$PROFILE_TOP" >"$PROFILE/$scen-$name.children.txt" || true
        # Self time by component: the kernel, the allocator, TLS, hyper/h2,
        # tokio, the policy engine, the proxy, serde, hashing, the rest.
        perf report -i "$WORK/perf-$scen-$name.data" --no-children --sort symbol --stdio -g none 2>/dev/null \
            | awk '$1 ~ /%$/ { p = $1 + 0; $1 = ""; s = $0
                c = "other"
                if (s ~ /\[k\]/) c = "kernel"
                else if (s ~ /malloc|free|_int_|realloc|cfree|tcache|arena/) c = "allocator"
                else if (s ~ /memmove|memcpy|memset|memcmp|strlen/) c = "memcpy/memset"
                else if (s ~ /aws_lc|aes|gcm|sha|rustls|ecp_|bn_|x25519|chacha/) c = "tls (rustls, aws-lc)"
                else if (s ~ /hyper|h2::|httparse|http::/) c = "http (hyper, h2, http)"
                else if (s ~ /tokio|mio::/) c = "tokio"
                else if (s ~ /meshward_policy/) c = "policy engine"
                else if (s ~ /meshward_proxy/) c = "proxy"
                else if (s ~ /serde|json/) c = "serde"
                else if (s ~ /sip::|[Hh]ash/) c = "hashing"
                else if (s ~ /prometheus/) c = "metrics"
                t[c] += p }
                END { for (c in t) printf "%6.1f%%  %s\n", t[c], c }' | sort -rn >"$PROFILE/$scen-$name.components.txt" || true
        # System calls per request, by kind.
        awk -F, -v n="${R_REQS_NOW:-0}" '$1 ~ /^[0-9]/ && n > 0 { sub(/.*sys_enter_/, "", $3); printf "%-16s %.2f per request\n", $3, $1 / n }' \
            "$WORK/perf-$scen-$name.stat" >"$PROFILE/$scen-$name.syscalls.txt" || true
        sed -i -E 's/[[:space:]]+$//; s/[[:space:]]+-[[:space:]]+-$//' "$PROFILE/$scen-$name.self.txt" "$PROFILE/$scen-$name.children.txt"
        log "$scen: profile of $name in $PROFILE/$scen-$name.{self,children,syscalls}.txt"
    done
}

# measure_rate scenario url hop_name=pid...: RATE requests per second held for
# RATE_DURATION seconds (after a 2 s warm-up at the same rate); each hop's
# CPU-seconds per second and RSS at the end.
RATE_ROWS=()
measure_rate() {
    ((RATE_RUN)) || return 0
    local scen=$1 url=$2 hop pid name out=$WORK/h2load-$scen.txt
    shift 2
    local -A before
    local per_client=$((RATE / RATE_CLIENTS))
    for hop in "$@"; do
        pid=${hop#*=}
        before[$pid]=$(cpu_ticks "$pid")
    done
    log "$scen: fixed rate $RATE req/s ($RATE_CLIENTS x $per_client) for ${RATE_DURATION}s, 1 KiB responses"
    local t0 t1
    t0=$(date +%s.%N)
    client_run "$H2LOAD" --h1 -c "$RATE_CLIENTS" --rps "$per_client" -D "$RATE_DURATION" --warm-up-time 2 \
        -H "Authorization: Bearer $JWT" "$url" >"$out" 2>&1 || die "$scen: h2load failed: $(tail -5 "$out")"
    t1=$(date +%s.%N)
    local done_ok failed
    done_ok=$(awk '/^requests:/ { print $8 }' "$out")
    failed=$(awk '/^requests:/ { print $10 + $12 }' "$out")
    [[ ${failed:-1} == 0 ]] || die "$scen: $failed requests failed at a fixed rate: $(grep -E '^(requests|status codes):' "$out")"
    local achieved row
    achieved=$(awk '/^finished in/ { gsub(",", "", $4); print $4 }' "$out")
    # The hops' CPU over the whole h2load run (warm-up included, as its time).
    row="$scen|$achieved"
    for hop in "$@"; do
        name=${hop%%=*}
        pid=${hop#*=}
        local used=$(($(cpu_ticks "$pid") - ${before[$pid]}))
        row+="|$(awk -v t="$used" -v hz="$CLK_TCK" -v a="$t0" -v b="$t1" 'BEGIN { printf "%.3f", (t / hz) / (b - a) }')"
        row+="|$(mib "$(rss_kib "$pid")")"
    done
    RATE_ROWS+=("$row")
    log "$scen: fixed rate: $achieved req/s achieved, $done_ok succeeded; ${row#*|}"
}

# measure scenario url hop_name=pid...
measure() {
    local scen=$1 url=$2
    shift 2
    local hop name pid
    local -A idle idle_anon before before_sys
    body=$(client_run curl -sSk --max-time 3 -H "Authorization: Bearer $JWT" "$url") || die "$scen: curl $url failed"
    [[ $body == ok ]] || die "$scen: unexpected body from $url: $body"
    for hop in "$@"; do
        pid=${hop#*=}
        idle[$pid]=$(rss_kib "$pid")
        idle_anon[$pid]=$(anon_kib "$pid")
    done
    log "$scen: warm-up $WARMUP"
    run_wrk "$url" "$WARMUP" "$WORK/wrk-$scen-warmup.txt"
    check_wrk "$scen (warm-up)" "$WORK/wrk-$scen-warmup.txt"
    local m0 m1 c0 c1 b0 b1 ours=0
    for hop in "$@"; do
        pid=${hop#*=}
        before[$pid]=$(cpu_ticks "$pid")
        before_sys[$pid]=$(sys_ticks "$pid")
    done
    children_ticks
    c0=$CHILD_TICKS
    b0=$(base_ticks)
    m0=$(machine_ticks)
    log "$scen: load $DURATION"
    local perf_pids=()
    if [[ -n ${PROFILE:-} ]]; then
        for hop in "$@"; do
            perf record -q -F "$PROFILE_HZ" -g -p "${hop#*=}" -o "$WORK/perf-$scen-${hop%%=*}.data" >/dev/null 2>&1 &
            perf_pids+=($!)
            perf stat -x, -e "$PROFILE_SYSCALLS" -p "${hop#*=}" -o "$WORK/perf-$scen-${hop%%=*}.stat" >/dev/null 2>&1 &
            perf_pids+=($!)
        done
    fi
    run_wrk "$url" "$DURATION" "$WORK/wrk-$scen.txt"
    m1=$(machine_ticks)
    b1=$(base_ticks)
    children_ticks
    c1=$CHILD_TICKS
    local wrk_out=$WORK/wrk-$scen.txt hop_rows=()
    for hop in "$@"; do
        name=${hop%%=*}
        pid=${hop#*=}
        proc_alive "$pid" || die "$scen: $name (pid $pid) died under load"
        local used=$(($(cpu_ticks "$pid") - ${before[$pid]}))
        ours=$((ours + used))
        hop_rows+=("$name:$used:${idle[$pid]}:$(rss_kib "$pid"):$(($(sys_ticks "$pid") - ${before_sys[$pid]})):${idle_anon[$pid]}:$(anon_kib "$pid")")
    done
    # What the rest of the machine used meanwhile: busy ticks not spent by
    # wrk, nginx, meshward server or the hops, as % of all CPU time.
    read -r m0b m0t <<<"$m0"
    read -r m1b m1t <<<"$m1"
    R_OTHER[$scen]=$(awk -v o=$((m1b - m0b - ours - (b1 - b0) - (c1 - c0))) -v t=$((m1t - m0t)) \
        'BEGIN { v = t > 0 ? 100 * o / t : 0; if (v < 0) v = 0; printf "%.0f", v }')
    if ((${#perf_pids[@]})); then
        kill -INT "${perf_pids[@]}" 2>/dev/null || true
        wait "${perf_pids[@]}" 2>/dev/null || true
        R_REQS_NOW=$(awk '/ requests in /{print $1}' "$wrk_out") profile_report "$scen" "$@"
    fi
    check_wrk "$scen" "$wrk_out"
    SCENARIOS+=("$scen")
    R_RPS[$scen]=$(awk '/^Requests\/sec:/{print $2}' "$wrk_out")
    R_REQS[$scen]=$(awk '/ requests in /{print $1}' "$wrk_out")
    R_P50[$scen]=$(to_ms "$(awk '$1=="50%"{print $2}' "$wrk_out")")
    R_P99[$scen]=$(to_ms "$(awk '$1=="99%"{print $2}' "$wrk_out")")
    R_HOPS[$scen]=${hop_rows[*]}
    R_WRK[$scen]=$((c1 - c0))
    log "$scen: ${R_RPS[$scen]} req/s, p50 ${R_P50[$scen]} ms, p99 ${R_P99[$scen]} ms (${R_REQS[$scen]} requests; other CPU ${R_OTHER[$scen]}%)"
}

# --- setup -----------------------------------------------------------------------

read -r -a P <<<"$(pick_ports 32)"
NGINX_PORT=${P[0]} CA_PORT=${P[1]}
log "work directory $WORK; meshward $MESHWARD"
# How busy the machine is before we start (1 s sample of /proc/stat): other
# work on a 2-core machine skews every number here.
busy_pct() {
    local a b
    read -r -a a < <(head -1 /proc/stat)
    sleep 1
    read -r -a b < <(head -1 /proc/stat)
    awk -v u=$((b[1] + b[2] + b[3] + b[6] + b[7] - a[1] - a[2] - a[3] - a[6] - a[7])) \
        -v t=$((b[1] + b[2] + b[3] + b[4] + b[5] + b[6] + b[7] + b[8] - a[1] - a[2] - a[3] - a[4] - a[5] - a[6] - a[7] - a[8])) \
        'BEGIN { printf "%.0f", (t > 0 ? 100 * u / t : 0) }'
}
# Waits up to QUIET_WAIT seconds for the machine to be under 10% busy; the
# last sample into BUSY (what: for messages).
wait_quiet() {
    local what=$1 waited
    BUSY=$(busy_pct)
    for ((waited = 1; BUSY >= 10 && waited < QUIET_WAIT; waited++)); do
        ((waited % 10 == 1)) && log "the machine is ${BUSY}% busy; waiting up to ${QUIET_WAIT}s for it to go quiet"
        BUSY=$(busy_pct)
    done
    log "CPU busy before $what: $BUSY% of $(nproc) cores (load average $(cut -d' ' -f1-3 /proc/loadavg))"
    ((BUSY < 10)) || log "WARNING: the machine is already ${BUSY}% busy; the numbers will be skewed"
}
wait_quiet "the run"
BUSY_BEFORE=$BUSY

# nginx
mkdir -p "$WORK/nginx-tmp"
render "$TEMPLATES/nginx.conf.in" "$WORK/nginx.conf" WORK="$WORK" NGINX_LISTEN="127.0.0.1:$NGINX_PORT" \
    ONE_KIB="$(head -c 1023 /dev/zero | tr '\0' x)\n"
"$NGINX" -t -p "$WORK" -c "$WORK/nginx.conf" -e "$WORK/nginx-error.log" >"$WORK/nginx-test.log" 2>&1 ||
    die "nginx -t: $(cat "$WORK/nginx-test.log")"
start_bg nginx "$NGINX" -p "$WORK" -c "$WORK/nginx.conf" -e "$WORK/nginx-error.log"
NGINX_PID=$LAST_PID
wait_until "nginx on $NGINX_PORT" 10 "$NGINX_PID" port_open "$NGINX_PORT"
NGINX_WORKERS=$(ps -o pid= --ppid "$NGINX_PID" | tr '\n' ' ')
log "nginx (pid $NGINX_PID, worker $NGINX_WORKERS) on 127.0.0.1:$NGINX_PORT"

# The mesh CA, tokens and haproxy's certificates.
DATA=$WORK/meshward-data
"$MESHWARD" ca init --data-dir "$DATA" --trust-domain "$TD" >"$WORK/ca-init.log" 2>&1 ||
    die "ca init: $(cat "$WORK/ca-init.log")"
"$MESHWARD" token create --data-dir "$DATA" -n "$NS" --service-account server >"$WORK/server.token"
"$MESHWARD" token create --data-dir "$DATA" -n "$NS" --service-account client >"$WORK/client.token"
CERTS=$WORK/certs
for who in haproxy-client haproxy-server; do
    "$MESHWARD" ca issue --data-dir "$DATA" -n "$NS" --service-account "$who" --out "$CERTS/$who" >&2
done
cat "$CERTS/haproxy-client/cert-chain.pem" "$CERTS/haproxy-client/key.pem" >"$CERTS/client.pem"
cat "$CERTS/haproxy-server/cert-chain.pem" "$CERTS/haproxy-server/key.pem" >"$CERTS/server.pem"
cp "$DATA/root-cert.pem" "$CERTS/root.pem"

start_bg meshward-server "$MESHWARD" server --data-dir "$DATA" --listen "127.0.0.1:$CA_PORT" --trust-domain "$TD"
CA_PID=$LAST_PID
wait_until "meshward server" 20 "$CA_PID" grep -q '^listening on' "$WORK/meshward-server.log"
log "meshward server (pid $CA_PID): $(grep -m1 '^listening on' "$WORK/meshward-server.log")"

# An RS256 JWT signed with the repository's test key (kid rsa-1).
b64url() { openssl base64 -A | tr '+/' '-_' | tr -d '='; }
NOW=$(date +%s)
JWT_HEAD=$(printf '%s' '{"alg":"RS256","typ":"JWT","kid":"rsa-1"}' | b64url)
JWT_BODY=$(printf '{"iss":"bench-issuer","sub":"bench","iat":%d,"exp":%d}' "$NOW" $((NOW + 10 * 365 * 86400)) | b64url)
JWT_SIG=$(printf '%s.%s' "$JWT_HEAD" "$JWT_BODY" | openssl dgst -sha256 -sign "$KEYS/rsa.pem" -binary | b64url)
JWT=$JWT_HEAD.$JWT_BODY.$JWT_SIG

# Policies, validated as the proxy will load them.
JWKS=$(tr -d '\n' <"$KEYS/jwks.json")
mkdir -p "$WORK/policies-l4" "$WORK/policies-l7" "$WORK/policies-l7-nojwt"
render "$TEMPLATES/policies-l4.yaml.in" "$WORK/policies-l4/policies.yaml"
render "$TEMPLATES/policies-l7.yaml.in" "$WORK/policies-l7/policies.yaml" JWKS="$JWKS"
render "$TEMPLATES/policies-l7-nojwt.yaml.in" "$WORK/policies-l7-nojwt/policies.yaml"
"$MESHWARD" validate -f "$WORK/policies-l4" -f "$WORK/policies-l7" -f "$WORK/policies-l7-nojwt" >&2 || die "policies do not validate"

# --- scenarios ---------------------------------------------------------------------

# direct
measure direct "http://127.0.0.1:$NGINX_PORT$PATH_OK"

next_port=2
take_port() {
    ((next_port < ${#P[@]})) || die "out of picked ports: raise pick_ports' count"
    PORT=${P[next_port]}
    next_port=$((next_port + 1))
}

# pair_metrics scenario server_ns server_admin client_ns client_admin: saves
# both proxies' metrics, warns of nonzero error counters, logs the server's
# inbound request and connection counts.
pair_metrics() {
    local scen=$1 errs
    run_in "$2" curl -s "http://$3/stats/prometheus" >"$WORK/metrics-$scen-server.txt" || true
    run_in "$4" curl -s "http://$5/stats/prometheus" >"$WORK/metrics-$scen-client.txt" || true
    errs=$(grep -hE '^meshward_(upstream_errors|log_records_dropped)_total' "$WORK/metrics-$scen-"*.txt | awk '$NF != 0' || true)
    [[ -z $errs ]] || log "$scen: WARNING nonzero error counters: $errs"
    grep -hE '^meshward_(requests|connections)_total\{[^}]*direction="inbound"' "$WORK/metrics-$scen-server.txt" |
        sed "s/^/[bench] $scen server proxy: /" >&2 || true
}

# policy_checks scenario protocol jwt(yes|no) base_url: what the server side's
# policies allow and refuse, asked through the pair at base_url.
policy_checks() {
    local scen=$1 proto=$2 jwt=$3 base=$4 auth=(-H "Authorization: Bearer $JWT")
    local url=$base$PATH_OK
    expect_status "$scen" 200 "GET $PATH_OK with JWT through the pair" "${auth[@]}" "$url"
    if [[ $proto == http ]]; then
        if [[ $jwt == yes ]]; then
            expect_status "$scen" 403 "GET without JWT" "$url"
            expect_status "$scen" 401 "GET with a tampered JWT" -H "Authorization: Bearer ${JWT}x" "$url"
        fi
        expect_status "$scen" 403 "GET /other (outside /bench/)" "${auth[@]}" "$base/other"
        expect_status "$scen" 403 "POST $PATH_OK" "${auth[@]}" -X POST "$url"
    fi
}

# meshward_pair scenario protocol policy_dir access_log(off|on) jwt(yes|no)
meshward_pair() {
    local scen=$1 proto=$2 policies=$3 access=$4 jwt=${5:-yes} cl_listen sv_in cl_admin sv_admin cl_log sv_log
    take_port; cl_listen=$PORT
    take_port; sv_in=$PORT
    take_port; cl_admin=$PORT
    take_port; sv_admin=$PORT
    cl_log=off sv_log=off
    if [[ $access == on ]]; then
        cl_log=$WORK/access-$scen-client.jsonl sv_log=$WORK/access-$scen-server.jsonl
    fi
    local common=(--ca-address "https://127.0.0.1:$CA_PORT" --ca-root "$DATA/root-cert.pem"
        --ca-server-name "$CA_SERVER_NAME" --audit-log off --drain-grace 1s)
    start_bg "$scen-server-proxy" "$MESHWARD" proxy --identity "$SERVER_ID" \
        --inbound "$sv_in=127.0.0.1:$NGINX_PORT,protocol=$proto" --policies "$policies" \
        --token-file "$WORK/server.token" --admin "127.0.0.1:$sv_admin" --access-log "$sv_log" "${common[@]}"
    local sv_pid=$LAST_PID
    start_bg "$scen-client-proxy" "$MESHWARD" proxy --identity "$CLIENT_ID" \
        --upstream "server.bench:80=127.0.0.1:$cl_listen,endpoint=127.0.0.1:$sv_in,identity=$SERVER_ID,protocol=$proto" \
        --token-file "$WORK/client.token" --admin "127.0.0.1:$cl_admin" --access-log "$cl_log" "${common[@]}"
    local cl_pid=$LAST_PID
    wait_until "$scen server proxy ready" 30 "$sv_pid" http_ok "http://127.0.0.1:$sv_admin/healthz/ready"
    wait_until "$scen client proxy ready" 30 "$cl_pid" http_ok "http://127.0.0.1:$cl_admin/healthz/ready"
    log "$scen: client proxy pid $cl_pid on $cl_listen, server proxy pid $sv_pid on $sv_in ($proto)"

    local url=http://127.0.0.1:$cl_listen$PATH_OK
    policy_checks "$scen" "$proto" "$jwt" "http://127.0.0.1:$cl_listen"
    # Plaintext straight to the server proxy: STRICT mTLS refuses it.
    expect_status "$scen" '!200' "plaintext to the server proxy, bypassing mTLS" \
        -H "Authorization: Bearer $JWT" "http://127.0.0.1:$sv_in$PATH_OK"

    measure "$scen" "$url" "client=$cl_pid" "server=$sv_pid"
    [[ $access == on ]] || measure_rate "$scen" "http://127.0.0.1:$cl_listen$PATH_1K" "client=$cl_pid" "server=$sv_pid"

    pair_metrics "$scen" "" "127.0.0.1:$sv_admin" "" "127.0.0.1:$cl_admin"
    if [[ $access == on ]]; then
        NOTES+=("$scen access logs: client $(wc -l <"$cl_log") lines / $(du -h "$cl_log" | cut -f1), server $(wc -l <"$sv_log") lines / $(du -h "$sv_log" | cut -f1)")
    fi
    stop_pid "$cl_pid"
    stop_pid "$sv_pid"
}

# haproxy_pair scenario mode [tls(yes|no)]
haproxy_pair() {
    local scen=$1 mode=$2 tls=${3:-yes} a_port b_port opts= client_tls= server_tls=
    take_port; a_port=$PORT
    take_port; b_port=$PORT
    [[ $mode == http ]] && opts='    option http-keep-alive'
    if [[ $tls == yes ]]; then
        client_tls="ssl verify required crt $CERTS/client.pem ca-file $CERTS/root.pem"
        server_tls="ssl crt $CERTS/server.pem ca-file $CERTS/root.pem verify required"
    fi
    render "$TEMPLATES/haproxy-client.cfg.in" "$WORK/$scen-a.cfg" MODE="$mode" HTTP_OPTIONS="$opts" \
        LISTEN_PORT="$a_port" UPSTREAM_PORT="$b_port" CLIENT_TLS="$client_tls"
    render "$TEMPLATES/haproxy-server.cfg.in" "$WORK/$scen-b.cfg" MODE="$mode" HTTP_OPTIONS="$opts" \
        LISTEN_PORT="$b_port" UPSTREAM_PORT="$NGINX_PORT" SERVER_TLS="$server_tls"
    local f
    for f in a b; do
        "$HAPROXY" -c -q -f "$WORK/$scen-$f.cfg" >"$WORK/$scen-$f-check.log" 2>&1 ||
            die "haproxy -c $scen-$f.cfg: $(cat "$WORK/$scen-$f-check.log")"
    done
    start_bg "$scen-b" "$HAPROXY" -db -f "$WORK/$scen-b.cfg"
    local b_pid=$LAST_PID
    start_bg "$scen-a" "$HAPROXY" -db -f "$WORK/$scen-a.cfg"
    local a_pid=$LAST_PID
    wait_until "$scen haproxy B" 10 "$b_pid" port_open "$b_port"
    wait_until "$scen haproxy A" 10 "$a_pid" port_open "$a_port"
    log "$scen: haproxy A pid $a_pid on $a_port, haproxy B pid $b_pid on $b_port (mode $mode)"
    local url=http://127.0.0.1:$a_port$PATH_OK
    expect_status "$scen" 200 "GET $PATH_OK through the pair" "$url"
    if [[ $tls == yes ]]; then
        expect_status "$scen" '!200' "plaintext to haproxy B, bypassing mTLS" "http://127.0.0.1:$b_port$PATH_OK"
    fi
    measure "$scen" "$url" "client=$a_pid" "server=$b_pid"
    measure_rate "$scen" "http://127.0.0.1:$a_port$PATH_1K" "client=$a_pid" "server=$b_pid"
    stop_pid "$a_pid"
    stop_pid "$b_pid"
}

# The outside world's certificate for both gateways (wrk does not verify it).
gateway_credentials() {
    GW_CREDS=$WORK/gateway-credentials
    [[ -f $GW_CREDS/bench.crt ]] && return 0
    mkdir -p "$GW_CREDS"
    openssl req -x509 -newkey ec -pkeyopt ec_paramgen_curve:P-256 -nodes -days 2 \
        -subj /CN=bench.example -addext subjectAltName=DNS:bench.example \
        -keyout "$GW_CREDS/bench.key" -out "$GW_CREDS/bench.crt" >"$WORK/gateway-cert.log" 2>&1 ||
        die "making the gateway certificate: $(cat "$WORK/gateway-cert.log")"
    cat "$GW_CREDS/bench.crt" "$GW_CREDS/bench.key" >"$GW_CREDS/bench.pem"
}

# meshward_gateway scenario
meshward_gateway() {
    local scen=$1 sv_in sv_admin gw_port gw_admin
    gateway_credentials
    take_port; sv_in=$PORT
    take_port; sv_admin=$PORT
    take_port; gw_port=$PORT
    take_port; gw_admin=$PORT
    mkdir -p "$WORK/policies-gateway"
    render "$TEMPLATES/policies-gateway.yaml.in" "$WORK/policies-gateway/policies.yaml"
    render "$TEMPLATES/gateway-config.yaml.in" "$WORK/gateway-config.yaml" SERVER_PORT="$sv_in"
    "$MESHWARD" apply -f "$WORK/gateway-config.yaml" --data-dir "$DATA" --server "https://127.0.0.1:$CA_PORT" \
        >"$WORK/$scen-apply.log" 2>&1 || die "$scen: apply: $(cat "$WORK/$scen-apply.log")"
    "$MESHWARD" token create --data-dir "$DATA" -n istio-system \
        --service-account istio-ingressgateway-service-account >"$WORK/gateway.token"
    local common=(--ca-address "https://127.0.0.1:$CA_PORT" --ca-root "$DATA/root-cert.pem"
        --ca-server-name "$CA_SERVER_NAME" --access-log off --audit-log off --drain-grace 1s)
    start_bg "$scen-server-proxy" "$MESHWARD" proxy --identity "$SERVER_ID" \
        --inbound "$sv_in=127.0.0.1:$NGINX_PORT,protocol=http" --policies "$WORK/policies-gateway" \
        --token-file "$WORK/server.token" --admin "127.0.0.1:$sv_admin" "${common[@]}"
    local sv_pid=$LAST_PID
    start_bg "$scen-gateway" "$MESHWARD" gateway --control-plane "127.0.0.1:$CA_PORT" \
        --listen 127.0.0.1 --port "443=$gw_port" --credentials-dir "$GW_CREDS" \
        --token-file "$WORK/gateway.token" --admin "127.0.0.1:$gw_admin" "${common[@]}"
    local gw_pid=$LAST_PID
    wait_until "$scen server proxy ready" 30 "$sv_pid" http_ok "http://127.0.0.1:$sv_admin/healthz/ready"
    wait_until "$scen gateway serving" 30 "$gw_pid" https_ok "https://127.0.0.1:$gw_port$PATH_OK"
    log "$scen: gateway pid $gw_pid on $gw_port, server proxy pid $sv_pid on $sv_in"
    expect_status "$scen" '!200' "plaintext to the server proxy, bypassing mTLS" "http://127.0.0.1:$sv_in$PATH_OK"
    measure "$scen" "https://127.0.0.1:$gw_port$PATH_OK" "gateway=$gw_pid" "server=$sv_pid"
    stop_pid "$gw_pid"
    stop_pid "$sv_pid"
}

# haproxy_gateway scenario
haproxy_gateway() {
    local scen=$1 g_port b_port
    gateway_credentials
    take_port; g_port=$PORT
    take_port; b_port=$PORT
    render "$TEMPLATES/haproxy-gateway.cfg.in" "$WORK/$scen-g.cfg" LISTEN_PORT="$g_port" \
        UPSTREAM_PORT="$b_port" CERTS="$CERTS" GATEWAY_PEM="$GW_CREDS/bench.pem"
    render "$TEMPLATES/haproxy-server.cfg.in" "$WORK/$scen-b.cfg" MODE=http HTTP_OPTIONS='    option http-keep-alive' \
        LISTEN_PORT="$b_port" UPSTREAM_PORT="$NGINX_PORT" SERVER_TLS="ssl crt $CERTS/server.pem ca-file $CERTS/root.pem verify required"
    local f
    for f in g b; do
        "$HAPROXY" -c -q -f "$WORK/$scen-$f.cfg" >"$WORK/$scen-$f-check.log" 2>&1 ||
            die "haproxy -c $scen-$f.cfg: $(cat "$WORK/$scen-$f-check.log")"
    done
    start_bg "$scen-b" "$HAPROXY" -db -f "$WORK/$scen-b.cfg"
    local b_pid=$LAST_PID
    start_bg "$scen-g" "$HAPROXY" -db -f "$WORK/$scen-g.cfg"
    local g_pid=$LAST_PID
    wait_until "$scen haproxy B" 10 "$b_pid" port_open "$b_port"
    wait_until "$scen haproxy G" 10 "$g_pid" https_ok "https://127.0.0.1:$g_port$PATH_OK"
    log "$scen: haproxy G pid $g_pid on $g_port, haproxy B pid $b_pid on $b_port"
    measure "$scen" "https://127.0.0.1:$g_port$PATH_OK" "gateway=$g_pid" "server=$b_pid"
    stop_pid "$g_pid"
    stop_pid "$b_pid"
}

# --- scenarios in network namespaces -------------------------------------------------

NSP=mwbench$$                   # every namespace's name starts with this
NS_GW4=198.18.0.254 NS_GW6=2001:2::fe
NS_CP_IP=198.18.0.1 NS_CLIENT_IP=198.18.0.2 NS_SERVER_IP=198.18.0.3
NS_VIP=240.240.0.10             # the ServiceEntry's address (Istio's auto-allocation range)
NS_APP_PORT=8080                # nginx's port, and the service's
NS_SV_IN=18080                  # explicit mode: the server proxy's --inbound port
NS_CL_LISTEN=18081              # explicit mode: the client proxy's --upstream listener
NS_CP_ADDR=$NS_CP_IP:15012
NS_ADMIN=127.0.0.1:15000        # each proxy's admin port, in its own namespace
MARK=1337

ns_add() { # name: records it, then makes it
    NETNS_MADE+=("$1")
    ip netns add "$1" || die "ip netns add $1"
}

# ns_host NAME INDEX: a host on the hub's bridge with 198.18.0.INDEX/24 and
# 2001:2::INDEX/64, routing the mesh's service ranges to the gateway, with a
# resolv.conf naming the gateway (which answers nothing).
ns_host() {
    local ns=$NSP-$1 i=$2
    ns_add "$ns"
    mkdir -p "/etc/netns/$ns"
    printf 'nameserver %s\noptions timeout:1 attempts:1\n' "$NS_GW4" >"/etc/netns/$ns/resolv.conf"
    ip -n "$ns" -batch - <<IP || die "setting up $ns"
link set lo up
link add eth0 type veth peer name v$i netns $NS_HUB
addr add 198.18.0.$i/24 dev eth0
addr add 2001:2::$i/64 dev eth0 nodad
link set eth0 up
route add 240.240.0.0/16 via $NS_GW4
route add 2001:2::/48 via $NS_GW6
IP
    ip -n "$NS_HUB" -batch - <<IP || die "plugging $ns into the bridge"
link set v$i addrgenmode none
link set v$i master br0
link set v$i up
IP
}

ns_topology() {
    NS_HUB=$NSP-hub NS_CP=$NSP-cp NS_CLIENT=$NSP-client NS_SERVER=$NSP-server
    ns_add "$NS_HUB"
    ip -n "$NS_HUB" -batch - <<IP || die "setting up the hub"
link add br0 type bridge
link set br0 addrgenmode none
addr add $NS_GW4/24 dev br0
addr add $NS_GW6/64 dev br0 nodad
link set br0 up
IP
    ns_host cp 1
    ns_host client 2
    ns_host server 3
    log "namespaces: ${NETNS_MADE[*]}"
}

ns_http_ok() { [[ $(ip netns exec "$1" curl -s -o /dev/null -w '%{http_code}' --max-time 2 "$2") == 200 ]]; }

# The namespaces, nginx in the server's, a CA and tokens of their own, and
# meshward server in cp watching $NS_CONFIG.
ns_prepare() {
    ns_topology
    local dir=$WORK/ns-nginx
    mkdir -p "$dir/nginx-tmp"
    render "$TEMPLATES/nginx.conf.in" "$dir/nginx.conf" WORK="$dir" NGINX_LISTEN="$NS_SERVER_IP:$NS_APP_PORT" \
        ONE_KIB="$(head -c 1023 /dev/zero | tr '\0' x)\n"
    ip netns exec "$NS_SERVER" "$NGINX" -t -p "$dir" -c "$dir/nginx.conf" -e "$dir/nginx-error.log" >"$WORK/ns-nginx-test.log" 2>&1 ||
        die "nginx -t (server namespace): $(cat "$WORK/ns-nginx-test.log")"
    start_bg ns-nginx ip netns exec "$NS_SERVER" "$NGINX" -p "$dir" -c "$dir/nginx.conf" -e "$dir/nginx-error.log"
    NS_NGINX_PID=$LAST_PID
    wait_until "nginx in $NS_SERVER" 10 "$NS_NGINX_PID" ns_http_ok "$NS_SERVER" "http://$NS_SERVER_IP:$NS_APP_PORT/"
    NS_NGINX_WORKERS=$(ps -o pid= --ppid "$NS_NGINX_PID" | tr '\n' ' ')
    log "nginx (pid $NS_NGINX_PID, worker $NS_NGINX_WORKERS) on $NS_SERVER_IP:$NS_APP_PORT in $NS_SERVER"

    NS_DATA=$WORK/ns-meshward-data NS_CONFIG=$WORK/ns-config
    mkdir -p "$NS_CONFIG"
    "$MESHWARD" ca init --data-dir "$NS_DATA" --trust-domain "$TD" >"$WORK/ns-ca-init.log" 2>&1 ||
        die "ca init: $(cat "$WORK/ns-ca-init.log")"
    "$MESHWARD" token create --data-dir "$NS_DATA" -n "$NS" --service-account server >"$WORK/ns-server.token"
    "$MESHWARD" token create --data-dir "$NS_DATA" -n "$NS" --service-account client >"$WORK/ns-client.token"
    # The watcher's info lines say when a configuration is loaded (or refused).
    start_bg ns-meshward-server ip netns exec "$NS_CP" env MESHWARD_LOG=warn,meshward_control_plane::watch=info "$MESHWARD" server --data-dir "$NS_DATA" \
        --listen "$NS_CP_ADDR" --trust-domain "$TD" --config-dir "$NS_CONFIG"
    NS_CP_PID=$LAST_PID
    wait_until "meshward server in $NS_CP" 20 "$NS_CP_PID" grep -q '^listening on' "$WORK/ns-meshward-server.log"
    log "meshward server (pid $NS_CP_PID) in $NS_CP: $(grep -m1 '^listening on' "$WORK/ns-meshward-server.log")"
}

count_in() { grep -c -- "$1" "$2" || true; }

# ns_configure layer(l4|l7) mode(explicit|transparent): the control plane's
# whole configuration, one file replaced at once; returns when the server
# has loaded it. The same registry for both modes but for where a peer
# reaches the server: explicit, the server proxy's --inbound port (the
# WorkloadEntry's `ports`, as Istio maps a named service port); transparent,
# nginx's own port, which capture hands to the server proxy. The policies
# are meshward-l4's or meshward-l7's.
ns_configure() {
    local layer=$1 mode=$2 name proto policies ports= before refused
    if [[ $layer == l4 ]]; then
        name=tcp proto=TCP policies=$WORK/policies-l4/policies.yaml
    else
        name=http proto=HTTP policies=$WORK/policies-l7/policies.yaml
    fi
    [[ $mode == explicit ]] && ports=", ports: {$name: $NS_SV_IN}"
    {
        cat <<YAML
apiVersion: networking.istio.io/v1
kind: WorkloadEntry
metadata: {name: client, namespace: $NS}
spec: {address: $NS_CLIENT_IP, serviceAccount: client, labels: {app: client}}
---
apiVersion: networking.istio.io/v1
kind: WorkloadEntry
metadata: {name: server, namespace: $NS}
spec: {address: $NS_SERVER_IP, serviceAccount: server, labels: {app: server}$ports}
---
apiVersion: networking.istio.io/v1
kind: ServiceEntry
metadata: {name: server, namespace: $NS}
spec:
  hosts: [server.$NS]
  addresses: [$NS_VIP]
  location: MESH_INTERNAL
  resolution: STATIC
  ports: [{number: $NS_APP_PORT, name: $name, protocol: $proto}]
  workloadSelector: {labels: {app: server}}
---
YAML
        cat "$policies"
    } >"$WORK/ns-bench.yaml"
    "$MESHWARD" validate -f "$WORK/ns-bench.yaml" >&2 || die "ns-$mode-$layer: the control plane's configuration does not validate"
    before=$(count_in 'config directory changed' "$WORK/ns-meshward-server.log")
    refused=$(count_in 'config directory refused' "$WORK/ns-meshward-server.log")
    mv "$WORK/ns-bench.yaml" "$NS_CONFIG/bench.yaml"
    ns_config_loaded() {
        (($(count_in 'config directory changed' "$WORK/ns-meshward-server.log") > before)) ||
            (($(count_in 'config directory refused' "$WORK/ns-meshward-server.log") > refused))
    }
    wait_until "the control plane loading $layer/$mode" 30 "$NS_CP_PID" ns_config_loaded
    (($(count_in 'config directory refused' "$WORK/ns-meshward-server.log") == refused)) ||
        die "the control plane refused the $layer/$mode configuration: $(tail -n 20 "$WORK/ns-meshward-server.log")"
}

ns_proxy_ready() { # namespace: ready, and configured by the control plane
    ns_http_ok "$1" "http://$NS_ADMIN/healthz/ready" &&
        ip netns exec "$1" curl -s --max-time 2 "http://$NS_ADMIN/config_dump" | grep -q '"source": "control plane'
}

# ns_pair scenario layer(l4|l7) mode(explicit|transparent)
ns_pair() {
    local scen=$1 layer=$2 mode=$3 proto=tcp url bypass sv_mode cl_mode
    [[ $layer == l7 ]] && proto=http
    ns_configure "$layer" "$mode"
    if [[ $mode == explicit ]]; then
        sv_mode=(--inbound "$NS_SERVER_IP:$NS_SV_IN=$NS_SERVER_IP:$NS_APP_PORT,protocol=$proto")
        cl_mode=(--upstream "server.$NS:$NS_APP_PORT=127.0.0.1:$NS_CL_LISTEN,protocol=$proto")
        url=http://127.0.0.1:$NS_CL_LISTEN bypass=http://$NS_SERVER_IP:$NS_SV_IN
    else
        sv_mode=(--capture) cl_mode=(--capture)
        url=http://$NS_VIP:$NS_APP_PORT bypass=http://$NS_SERVER_IP:$NS_APP_PORT
    fi
    # Everything but the mode's own flags is the same in both modes.
    local common=(--control-plane "$NS_CP_ADDR" --ca-address "https://$NS_CP_ADDR"
        --ca-root "$NS_DATA/root-cert.pem" --ca-server-name "$CA_SERVER_NAME" --proxy-mark "$MARK"
        --admin "$NS_ADMIN" --access-log off --audit-log off --drain-grace 1s)
    start_bg "$scen-server-proxy" ip netns exec "$NS_SERVER" "$MESHWARD" proxy --identity "$SERVER_ID" \
        --workload "$NS/server" --token-file "$WORK/ns-server.token" "${sv_mode[@]}" "${common[@]}"
    local sv_pid=$LAST_PID
    start_bg "$scen-client-proxy" ip netns exec "$NS_CLIENT" "$MESHWARD" proxy --identity "$CLIENT_ID" \
        --workload "$NS/client" --token-file "$WORK/ns-client.token" "${cl_mode[@]}" "${common[@]}"
    local cl_pid=$LAST_PID
    wait_until "$scen server proxy configured" 30 "$sv_pid" ns_proxy_ready "$NS_SERVER"
    wait_until "$scen client proxy configured" 30 "$cl_pid" ns_proxy_ready "$NS_CLIENT"
    log "$scen: client proxy pid $cl_pid, server proxy pid $sv_pid ($mode, $proto); wrk calls $url"

    CLIENT_NS=$NS_CLIENT
    policy_checks "$scen" "$proto" yes "$url"
    # Plaintext from a host without a proxy: STRICT mTLS refuses it (in
    # transparent mode, at nginx's own port, which capture hands to the proxy).
    CLIENT_NS=$NS_CP expect_status "$scen" '!200' "plaintext from $NS_CP to $bypass, bypassing mTLS" \
        -H "Authorization: Bearer $JWT" "$bypass$PATH_OK"
    measure "$scen" "$url$PATH_OK" "client=$cl_pid" "server=$sv_pid"
    if ((NS_PACE_MS > 0)); then
        WRK_EXTRA=(-s "$WORK/pace.lua")
        measure "$scen-paced" "$url$PATH_OK" "client=$cl_pid" "server=$sv_pid"
        WRK_EXTRA=()
    fi
    CLIENT_NS=

    pair_metrics "$scen" "$NS_SERVER" "$NS_ADMIN" "$NS_CLIENT" "$NS_ADMIN"
    stop_pid "$cl_pid"
    stop_pid "$sv_pid"
    if [[ $mode == transparent ]]; then
        # A proxy stopped cleanly removed its rules; one that had to be
        # killed did not: the next scenario must start without them. Then
        # the nat tables go too: `capture uninstall` rightly leaves them
        # (they are not meshward's), but their empty base chains keep NAT's
        # hooks, and so connection tracking, on every packet of the
        # namespace, which would charge the next explicit scenario part of
        # capture's cost. Nothing else uses them in these namespaces.
        local ns family
        for ns in "$NS_CLIENT" "$NS_SERVER"; do
            ip netns exec "$ns" "$MESHWARD" capture uninstall >>"$WORK/ns-capture-uninstall.log" 2>&1 ||
                die "capture uninstall in $ns: $(tail -n 5 "$WORK/ns-capture-uninstall.log")"
            for family in ip ip6; do
                ip netns exec "$ns" nft delete table "$family" nat 2>/dev/null || true
            done
            [[ -z $(ip netns exec "$ns" nft list ruleset 2>/dev/null) ]] ||
                die "$ns still has netfilter rules after $scen: $(ip netns exec "$ns" nft list ruleset)"
        done
    fi
}

wanted meshward-l4 && meshward_pair meshward-l4 tcp "$WORK/policies-l4" off
wanted meshward-l7 && meshward_pair meshward-l7 http "$WORK/policies-l7" off
wanted meshward-l7-nojwt && meshward_pair meshward-l7-nojwt http "$WORK/policies-l7-nojwt" off no
[[ $ACCESS_LOG_RUN == 1 ]] && wanted meshward-l7-log && meshward_pair meshward-l7-log http "$WORK/policies-l7" on
wanted haproxy-tcp && haproxy_pair haproxy-tcp tcp
wanted haproxy-http && haproxy_pair haproxy-http http
wanted relay-tcp && haproxy_pair relay-tcp tcp no
wanted meshward-gateway && meshward_gateway meshward-gateway
wanted haproxy-gateway && haproxy_gateway haproxy-gateway
if ((NS_WANTED)); then
    ns_prepare
    wait_quiet "the namespaced scenarios"
    printf 'function delay()\n    return %d\nend\n' "$NS_PACE_MS" >"$WORK/pace.lua"
    CLIENT_NS=$NS_CLIENT
    measure ns-direct "http://$NS_SERVER_IP:$NS_APP_PORT$PATH_OK"
    if ((NS_PACE_MS > 0)); then
        WRK_EXTRA=(-s "$WORK/pace.lua")
        measure ns-direct-paced "http://$NS_SERVER_IP:$NS_APP_PORT$PATH_OK"
        WRK_EXTRA=()
    fi
    CLIENT_NS=
    # Each transparent scenario right beside its explicit twin, so the two
    # that are compared run as close together as they can. NS_ROUNDS > 1
    # measures each pair again (ns-explicit-l4.2, …), for as many capture
    # costs; even rounds run transparent first, so that neither mode always
    # has the later turn.
    for ((round = 1; round <= NS_ROUNDS; round++)); do
        sfx= modes=(explicit transparent)
        if ((round > 1)); then sfx=.$round; fi
        if ((round % 2 == 0)); then modes=(transparent explicit); fi
        for layer in l4 l7; do
            for mode in "${modes[@]}"; do
                if wanted "ns-$mode-$layer"; then ns_pair "ns-$mode-$layer$sfx" "$layer" "$mode"; fi
            done
        done
    done
fi

# --- report ------------------------------------------------------------------------

ratio() { awk -v a="$1" -v b="$2" 'BEGIN { if (b > 0) printf "%.2f", a / b; else printf "-" }'; }
hop_field() { # hops-string index(0|1) field(1=name 2=ticks 3=idle 4=end 5=kernel ticks 6=idle anon 7=end anon)
    local h
    read -r -a h <<<"$2"
    ((${#h[@]} > $1)) || { echo "-"; return; }
    echo "${h[$1]}" | cut -d: -f"$3"
}
us_per_req() { # ticks requests -> CPU microseconds per request
    awk -v t="$1" -v n="$2" -v hz="$CLK_TCK" 'BEGIN { printf "%.2f", (t / hz) / n * 1e6 }'
}
cpu_per_1k() { # ticks requests
    awk -v t="$1" -v n="$2" -v hz="$CLK_TCK" 'BEGIN { printf "%.4f", (t / hz) / (n / 1000) }'
}

ROWS=()
for s in "${SCENARIOS[@]}"; do
    base=direct
    [[ $s == ns-* ]] && base=ns-direct
    [[ $s == ns-*-paced ]] && base=ns-direct-paced
    hop_str=${R_HOPS[$s]}
    cpu_col=() idle_col=() end_col=()
    for i in 0 1; do
        t=$(hop_field "$i" "$hop_str" 2)
        if [[ $t == - || -z $t ]]; then
            cpu_col+=("-") idle_col+=("-") end_col+=("-")
        else
            cpu_col+=("$(cpu_per_1k "$t" "${R_REQS[$s]}")")
            idle_col+=("$(mib "$(hop_field "$i" "$hop_str" 3)")")
            end_col+=("$(mib "$(hop_field "$i" "$hop_str" 4)")")
        fi
    done
    ROWS+=("$s|$(printf '%.0f' "${R_RPS[$s]}")|$(ratio "${R_RPS[$s]}" "${R_RPS[$base]}")|${R_P50[$s]}|$(ratio "${R_P50[$s]}" "${R_P50[$base]}")|${R_P99[$s]}|$(ratio "${R_P99[$s]}" "${R_P99[$base]}")|${cpu_col[0]}|${cpu_col[1]}|${idle_col[0]}|${idle_col[1]}|${end_col[0]}|${end_col[1]}|${R_OTHER[$s]}")
done

HEADER="scenario|req/s|req/s ÷ direct|p50 ms|p50 ÷ direct|p99 ms|p99 ÷ direct|CPU-s/1k req hop1|CPU-s/1k req hop2|RSS idle MiB hop1|RSS idle MiB hop2|RSS end MiB hop1|RSS end MiB hop2|other CPU %"

echo
echo "== proxy load: wrk -t$THREADS -c$CONNECTIONS -d$DURATION --latency (after a $WARMUP warm-up), $(nproc) cores =="
echo "hop1 = client-side proxy (wrk's side), hop2 = server-side proxy (nginx's side); ns-* rows are ÷ ns-direct"
echo
{
    echo "$HEADER"
    printf '%s\n' "${ROWS[@]}"
} | column -t -s '|'
echo
echo "Markdown:"
echo
echo "| ${HEADER//|/ | } |"
echo "|---|$(printf -- '---:|%.0s' $(seq 13))"
for r in "${ROWS[@]}"; do echo "| ${r//|/ | } |"; done

# CPU per request per hop, in µs, against haproxy of the same layer (mTLS)
# and against the plaintext relay (the floor).
us_hop() { # scenario hop-index -> µs per request, or -
    local t
    t=$(hop_field "$2" "${R_HOPS[$1]:-}" 2)
    if [[ $t == - || -z $t || -z ${R_REQS[$1]:-} ]]; then echo -; else us_per_req "$t" "${R_REQS[$1]}"; fi
}
HOP_ROWS=()
for s in "${SCENARIOS[@]}"; do
    [[ $s == meshward-* || $s == haproxy-* ]] || continue
    [[ $s == *gateway* ]] && continue
    peer=haproxy-http
    [[ $s == meshward-l4 || $s == haproxy-tcp ]] && peer=haproxy-tcp
    h1=$(us_hop "$s" 0) h2=$(us_hop "$s" 1)
    anon=
    for i in 0 1; do
        a=$(hop_field "$i" "${R_HOPS[$s]}" 6) e=$(hop_field "$i" "${R_HOPS[$s]}" 7)
        anon+="${anon:+ / }$(mib "${a:-0}") → $(mib "${e:-0}")"
    done
    HOP_ROWS+=("$s|$h1 / $h2|$(ratio "$h1" "$(us_hop "$peer" 0)") / $(ratio "$h2" "$(us_hop "$peer" 1)") ($peer)|$(ratio "$h1" "$(us_hop relay-tcp 0)") / $(ratio "$h2" "$(us_hop relay-tcp 1)")|$anon")
done
if ((${#HOP_ROWS[@]})); then
    echo
    echo "CPU per request per hop (hop1 / hop2), µs, and ratios to haproxy of the same layer and to the plaintext relay (relay-tcp: $(us_hop relay-tcp 0) / $(us_hop relay-tcp 1) µs):"
    echo
    echo "| scenario | µs per request | ÷ haproxy | ÷ relay-tcp | anonymous memory MiB, idle → loaded (hop1 / hop2) |"
    echo "|---|---:|---:|---:|---:|"
    for r in "${HOP_ROWS[@]}"; do echo "| ${r//|/ | } |"; done
fi

if ((${#RATE_ROWS[@]})); then
    echo
    echo "Fixed rate: h2load --h1 -c $RATE_CLIENTS --rps $((RATE / RATE_CLIENTS)) -D $RATE_DURATION (after 2 s warm-up), $RATE req/s of 1 KiB responses; vCPU = CPU-seconds per second of the run:"
    echo
    echo "| scenario | req/s achieved | hop1 vCPU | hop1 RSS MiB | hop2 vCPU | hop2 RSS MiB |"
    echo "|---|---:|---:|---:|---:|---:|"
    for r in "${RATE_ROWS[@]}"; do echo "| ${r//|/ | } |"; done
fi

# Capture cost: transparent minus explicit CPU per request, per hop, for
# each layer whose two scenarios both ran.
CAPTURE_BUDGET_US=2
budget_met() { awk -v d="$1" -v b="$CAPTURE_BUDGET_US" 'BEGIN { print (d <= b ? "yes" : "NO") }'; }
median() { printf '%s\n' "$@" | sort -g | awk '{ v[NR] = $1 } END { printf "%+.2f", NR % 2 ? v[(NR + 1) / 2] : (v[NR / 2] + v[NR / 2 + 1]) / 2 }'; }
CC_ROWS=()
for kind in "" -paced; do
for layer in l4 l7; do
    deltas=("" "")
    for ((round = 1; round <= NS_ROUNDS; round++)); do
        sfx= label=${layer^^}${kind:+ paced}
        if ((round > 1)); then sfx=.$round; fi
        if ((NS_ROUNDS > 1)); then label+=" round $round"; fi
        e=ns-explicit-$layer$sfx$kind t=ns-transparent-$layer$sfx$kind
        [[ -n ${R_REQS[$e]:-} && -n ${R_REQS[$t]:-} ]] || continue
        for i in 0 1; do
            name=$(hop_field "$i" "${R_HOPS[$e]}" 1)
            eu=$(us_per_req "$(hop_field "$i" "${R_HOPS[$e]}" 2)" "${R_REQS[$e]}")
            tu=$(us_per_req "$(hop_field "$i" "${R_HOPS[$t]}" 2)" "${R_REQS[$t]}")
            d=$(awk -v a="$tu" -v b="$eu" 'BEGIN { printf "%+.2f", a - b }')
            # How much of it is kernel time (stime): capture's NAT and
            # connection tracking run in the proxy's system calls.
            ks=$(awk -v a="$(us_per_req "$(hop_field "$i" "${R_HOPS[$t]}" 5)" "${R_REQS[$t]}")" \
                -v b="$(us_per_req "$(hop_field "$i" "${R_HOPS[$e]}" 5)" "${R_REQS[$e]}")" 'BEGIN { printf "%+.2f", a - b }')
            deltas[i]+=" $d"
            met=$(budget_met "$d")
            CC_ROWS+=("$label|hop$((i + 1)) ($name proxy)|$eu|$tu|$d|$ks|${R_OTHER[$e]} / ${R_OTHER[$t]}|≤ $CAPTURE_BUDGET_US|$met")
            log "capture cost $label hop$((i + 1)) ($name proxy): $eu -> $tu µs/request ($d, kernel $ks; budget ≤ $CAPTURE_BUDGET_US: $met; other CPU ${R_OTHER[$e]}% / ${R_OTHER[$t]}%)"
        done
        # The application's side, for context (not a hop): wrk's own CPU,
        # which pays for the NAT of its connections in transparent mode.
        eu=$(us_per_req "${R_WRK[$e]}" "${R_REQS[$e]}")
        tu=$(us_per_req "${R_WRK[$t]}" "${R_REQS[$t]}")
        d=$(awk -v a="$tu" -v b="$eu" 'BEGIN { printf "%+.2f", a - b }')
        CC_ROWS+=("$label|wrk (the application; not a hop)|$eu|$tu|$d||${R_OTHER[$e]} / ${R_OTHER[$t]}|-|-")
    done
    if ((NS_ROUNDS > 1)); then
        for i in 0 1; do
            [[ -n ${deltas[i]} ]] || continue
            # shellcheck disable=SC2086 # the list of this hop's costs
            d=$(median ${deltas[i]})
            CC_ROWS+=("${layer^^}${kind:+ paced} median of $NS_ROUNDS|hop$((i + 1))|||$d|||≤ $CAPTURE_BUDGET_US|$(budget_met "$d")")
            log "capture cost ${layer^^}${kind:+ paced} hop$((i + 1)), median of $NS_ROUNDS rounds: $d µs/request (each:${deltas[i]})"
        done
    fi
done
done
if ((${#CC_ROWS[@]})); then
    CC_HEADER="layer|process|explicit CPU µs/req|transparent CPU µs/req|capture cost µs/req|of which kernel|other CPU % (expl. / transp.)|budget µs/req|met"
    echo
    echo "== capture cost: transparent minus explicit CPU per request, per hop (same run) =="
    echo
    {
        echo "$CC_HEADER"
        printf '%s\n' "${CC_ROWS[@]}"
    } | column -t -s '|'
    echo
    echo "Markdown:"
    echo
    echo "| ${CC_HEADER//|/ | } |"
    echo "|---|---|---:|---:|---:|---:|---:|---:|---|"
    for r in "${CC_ROWS[@]}"; do echo "| ${r//|/ | } |"; done
    echo
    echo "Kernel: the difference in stime alone. Other CPU: as in the table above; a round where either is over 10 % compares a disturbed run."
fi
echo
echo "- wrk $("$WRK" -v 2>&1 | head -1 | awk '{print $2}'), \`wrk -t$THREADS -c$CONNECTIONS -d$DURATION --latency\`, $WARMUP warm-up, every request with the same \`Authorization: Bearer\` RS256 JWT; backend nginx $("$NGINX" -v 2>&1 | sed 's/.*nginx\///'), 1 worker, \`return 200 \"ok\\n\"\`."
echo "- meshward $("$MESHWARD" --version 2>/dev/null | awk '{print $NF}') (\`$MESHWARD\`; repository at $(git -C "$REPO" rev-parse --short HEAD 2>/dev/null || echo unknown)), \`--access-log off --audit-log off\` except meshward-l7-log (access logs to files); haproxy $("$HAPROXY" -v | head -1 | awk '{print $3}') with default threads."
echo "- Identity checks: meshward's client side accepts only the server's SPIFFE ID (secure naming) and the server side allows only the client's principal (L4: per connection; L7: per request, with GET + /bench/* and, in meshward-l7, a verified RS256 JWT); haproxy verifies both chains against the mesh root but checks no SPIFFE ID."
echo "- other CPU %: busy CPU time during the measured phase not spent by wrk, nginx, meshward server or the hops (other processes, interrupts, hypervisor steal), as % of the machine; more than a few % means the row is skewed."
echo "- CPU per hop: utime+stime of that proxy process during the measured phase, ÷ (requests ÷ 1,000). RSS: VmRSS before any load and right after it. VmRSS counts the executable's pages mapped from the page cache, shared by every process running the same binary; anonymous memory (RssAnon: heap, stacks) is what each proxy adds."
echo "- $(nproc) cores, $(grep -m1 'model name' /proc/cpuinfo | cut -d: -f2 | sed 's/^ //'); CPU ${BUSY_BEFORE}% busy in the second before the run (anything else running skews the numbers). wrk, nginx and both proxies share the cores."
if [[ -n ${R_REQS[ns-direct]:-} ]]; then
    echo "- ns-*: wrk in a client network namespace, nginx in a server namespace (198.18.0.3:$NS_APP_PORT), joined by veth pairs through a bridge; proxies configured by meshward server in a third namespace, with the same flags in both modes but the mode's own: explicit \`--upstream\`/\`--inbound\`, transparent \`--capture\` (both \`--proxy-mark $MARK\`). Transparent: wrk calls the ServiceEntry address $NS_VIP:$NS_APP_PORT. -paced: the same processes again, each wrk connection waiting $NS_PACE_MS ms after every response (ratios to ns-direct-paced). Capture cost: transparent minus explicit CPU per request of each hop; budget ≤ $CAPTURE_BUDGET_US µs per request per hop. wrk's own CPU is shown for context."
fi
for n in "${NOTES[@]}"; do echo "- $n"; done
for s in "${SCENARIOS[@]}"; do
    if ((${R_OTHER[$s]} > 10)); then
        echo "- WARNING: $s ran while ${R_OTHER[$s]}% of the machine went to other work: its numbers are skewed; run again on a quiet machine."
        log "WARNING: $s: other CPU ${R_OTHER[$s]}%"
    fi
done
