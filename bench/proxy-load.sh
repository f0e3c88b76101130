#!/usr/bin/env bash
# Load benchmark of the meshward sidecar proxy, on one machine, over loopback.
#
#   bench/proxy-load.sh            # builds target/release/meshward if missing
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
#
# haproxy's certificates are issued by the same meshward CA (`meshward ca issue`).
# Reported per scenario: requests/s, p50 and p99 latency (and their ratios to
# direct), and for each proxy process ("hop"): CPU-seconds (utime+stime from
# /proc/PID/stat) spent during the measured phase per 1,000 requests, and VmRSS
# when idle (before any load) and at the end of the load. Progress goes to
# stderr; the tables (plain and markdown, for BENCHMARKS.md) to stdout.
#
# Everything listens on 127.0.0.1, on free ports picked at start. Every process
# the script starts is stopped on exit. A non-2xx response or a socket error
# under load fails the run (exit 1) and prints the logs.
#
# Settings (environment): DURATION=10s WARMUP=2s CONNECTIONS=32 THREADS=1
# ACCESS_LOG_RUN=1 KEEP=0 (1 keeps the work directory with logs and configs),
# QUIET_WAIT=60 (seconds to wait, at start, for the machine to be under 10% busy),
# ONLY="meshward-l4 meshward-l7 meshward-l7-nojwt meshward-l7-log haproxy-tcp haproxy-http" (a subset
# runs only those, after direct).
# Needs: wrk, haproxy, nginx, curl, openssl, ss, column, ps (installed with apt-get when
# missing; sudo is used when not root).

set -euo pipefail
shopt -u patsub_replacement 2>/dev/null || true

BENCH_DIR=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
REPO=$(cd "$BENCH_DIR/.." && pwd)
TEMPLATES=$BENCH_DIR/templates
KEYS=$REPO/crates/policy/tests/keys

DURATION=${DURATION:-10s}
WARMUP=${WARMUP:-2s}
CONNECTIONS=${CONNECTIONS:-32}
THREADS=${THREADS:-1}
ACCESS_LOG_RUN=${ACCESS_LOG_RUN:-1}
KEEP=${KEEP:-0}
QUIET_WAIT=${QUIET_WAIT:-60}   # seconds to wait for the machine to be < 10% busy
# Which scenarios after direct (always run: the ratios are to it).
ONLY=${ONLY:-meshward-l4 meshward-l7 meshward-l7-nojwt meshward-l7-log haproxy-tcp haproxy-http}

NS=bench
TD=cluster.local
CLIENT_ID=spiffe://$TD/ns/$NS/sa/client
SERVER_ID=spiffe://$TD/ns/$NS/sa/server
CA_SERVER_NAME=istiod.istio-system.svc   # a DNS name in meshward server's certificate
PATH_OK=/bench/ok

log() { printf '[bench %s] %s\n' "$(date +%T)" "$*" >&2; }
die() {
    log "FAIL: $*"
    exit 1
}

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
for t in WRK HAPROXY NGINX; do [[ -n ${!t} ]] || die "${t,,} not found after install"; done

if [[ -z ${MESHWARD:-} ]]; then
    MESHWARD=$REPO/target/release/meshward
    if [[ ! -x $MESHWARD ]]; then
        log "building $MESHWARD"
        (cd "$REPO" && nice -n 19 cargo build --release -p meshward >&2)
    fi
fi
[[ -x $MESHWARD ]] || die "MESHWARD=$MESHWARD is not an executable"

CLK_TCK=$(getconf CLK_TCK)

# --- processes -----------------------------------------------------------------

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

cleanup() {
    local rc=$? i
    set +e
    trap - EXIT INT TERM
    for ((i = ${#PIDS[@]} - 1; i >= 0; i--)); do
        stop_pid "${PIDS[i]}"
    done
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
    for pid in $NGINX_PID $NGINX_WORKERS $CA_PID; do
        proc_alive "$pid" && n=$((n + $(cpu_ticks "$pid")))
    done
    echo "$n"
}

rss_kib() { awk '/^VmRSS:/{print $2}' "/proc/$1/status"; }

to_ms() { # wrk duration (12.3us, 4.5ms, 1.2s, 1.0m) -> ms
    awk -v v="$1" 'BEGIN {
        if (v ~ /us$/) { sub(/us$/, "", v); printf "%.3f", v / 1000 }
        else if (v ~ /ms$/) { sub(/ms$/, "", v); printf "%.3f", v }
        else if (v ~ /m$/) { sub(/m$/, "", v); printf "%.3f", v * 60000 }
        else if (v ~ /s$/) { sub(/s$/, "", v); printf "%.3f", v * 1000 }
        else { printf "nan" } }'
}

run_wrk() { # url duration out
    "$WRK" -t"$THREADS" -c"$CONNECTIONS" -d"$2" --latency \
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
    got=$(curl -s -o /dev/null -w '%{http_code}' --max-time 3 "$@" || true)
    if [[ $want == '!200' ]]; then
        [[ $got != 200 ]] || die "$scen sanity check: $what: HTTP $got, wanted a refusal"
    else
        [[ $got == "$want" ]] || die "$scen sanity check: $what: HTTP $got, wanted $want"
    fi
    [[ $got == 000 ]] && got="000 (no HTTP answer: refused or closed)"
    log "  ok: $what -> $got"
}

declare -A R_RPS R_P50 R_P99 R_REQS R_HOPS R_OTHER
SCENARIOS=()

# measure scenario url hop_name=pid...
measure() {
    local scen=$1 url=$2
    shift 2
    local hop name pid
    local -A idle before
    body=$(curl -sS --max-time 3 -H "Authorization: Bearer $JWT" "$url") || die "$scen: curl $url failed"
    [[ $body == ok ]] || die "$scen: unexpected body from $url: $body"
    for hop in "$@"; do
        pid=${hop#*=}
        idle[$pid]=$(rss_kib "$pid")
    done
    log "$scen: warm-up $WARMUP"
    run_wrk "$url" "$WARMUP" "$WORK/wrk-$scen-warmup.txt"
    check_wrk "$scen (warm-up)" "$WORK/wrk-$scen-warmup.txt"
    local m0 m1 c0 c1 b0 b1 ours=0
    for hop in "$@"; do
        pid=${hop#*=}
        before[$pid]=$(cpu_ticks "$pid")
    done
    children_ticks
    c0=$CHILD_TICKS
    b0=$(base_ticks)
    m0=$(machine_ticks)
    log "$scen: load $DURATION"
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
        hop_rows+=("$name:$used:${idle[$pid]}:$(rss_kib "$pid")")
    done
    # What the rest of the machine used meanwhile: busy ticks not spent by
    # wrk, nginx, meshward server or the hops, as % of all CPU time.
    read -r m0b m0t <<<"$m0"
    read -r m1b m1t <<<"$m1"
    R_OTHER[$scen]=$(awk -v o=$((m1b - m0b - ours - (b1 - b0) - (c1 - c0))) -v t=$((m1t - m0t)) \
        'BEGIN { v = t > 0 ? 100 * o / t : 0; if (v < 0) v = 0; printf "%.0f", v }')
    check_wrk "$scen" "$wrk_out"
    SCENARIOS+=("$scen")
    R_RPS[$scen]=$(awk '/^Requests\/sec:/{print $2}' "$wrk_out")
    R_REQS[$scen]=$(awk '/ requests in /{print $1}' "$wrk_out")
    R_P50[$scen]=$(to_ms "$(awk '$1=="50%"{print $2}' "$wrk_out")")
    R_P99[$scen]=$(to_ms "$(awk '$1=="99%"{print $2}' "$wrk_out")")
    R_HOPS[$scen]=${hop_rows[*]}
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
BUSY_BEFORE=$(busy_pct)
for ((waited = 1; BUSY_BEFORE >= 10 && waited < QUIET_WAIT; waited++)); do
    ((waited % 10 == 1)) && log "the machine is ${BUSY_BEFORE}% busy; waiting up to ${QUIET_WAIT}s for it to go quiet"
    BUSY_BEFORE=$(busy_pct)
done
log "CPU busy before the run: $BUSY_BEFORE% of $(nproc) cores (load average $(cut -d' ' -f1-3 /proc/loadavg))"
((BUSY_BEFORE < 10)) || log "WARNING: the machine is already ${BUSY_BEFORE}% busy; the numbers will be skewed"

# nginx
mkdir -p "$WORK/nginx-tmp"
render "$TEMPLATES/nginx.conf.in" "$WORK/nginx.conf" WORK="$WORK" NGINX_PORT="$NGINX_PORT"
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

    local url=http://127.0.0.1:$cl_listen$PATH_OK auth=(-H "Authorization: Bearer $JWT")
    expect_status "$scen" 200 "GET $PATH_OK with JWT through the pair" "${auth[@]}" "$url"
    if [[ $proto == http ]]; then
        if [[ $jwt == yes ]]; then
            expect_status "$scen" 403 "GET without JWT" "$url"
            expect_status "$scen" 401 "GET with a tampered JWT" -H "Authorization: Bearer ${JWT}x" "$url"
        fi
        expect_status "$scen" 403 "GET /other (outside /bench/)" "${auth[@]}" "http://127.0.0.1:$cl_listen/other"
        expect_status "$scen" 403 "POST $PATH_OK" "${auth[@]}" -X POST "$url"
    fi
    # Plaintext straight to the server proxy: STRICT mTLS refuses it.
    expect_status "$scen" '!200' "plaintext to the server proxy, bypassing mTLS" "${auth[@]}" "http://127.0.0.1:$sv_in$PATH_OK"

    measure "$scen" "$url" "client=$cl_pid" "server=$sv_pid"

    curl -s "http://127.0.0.1:$sv_admin/stats/prometheus" >"$WORK/metrics-$scen-server.txt" || true
    curl -s "http://127.0.0.1:$cl_admin/stats/prometheus" >"$WORK/metrics-$scen-client.txt" || true
    local errs
    errs=$(grep -hE '^meshward_(upstream_errors|log_records_dropped)_total' "$WORK/metrics-$scen-"*.txt | awk '$NF != 0' || true)
    [[ -z $errs ]] || log "$scen: WARNING nonzero error counters: $errs"
    grep -hE '^meshward_(requests|connections)_total\{[^}]*direction="inbound"' "$WORK/metrics-$scen-server.txt" |
        sed "s/^/[bench] $scen server proxy: /" >&2 || true
    if [[ $access == on ]]; then
        NOTES+=("$scen access logs: client $(wc -l <"$cl_log") lines / $(du -h "$cl_log" | cut -f1), server $(wc -l <"$sv_log") lines / $(du -h "$sv_log" | cut -f1)")
    fi
    stop_pid "$cl_pid"
    stop_pid "$sv_pid"
}

# haproxy_pair scenario mode
haproxy_pair() {
    local scen=$1 mode=$2 a_port b_port opts=
    take_port; a_port=$PORT
    take_port; b_port=$PORT
    [[ $mode == http ]] && opts='    option http-keep-alive'
    render "$TEMPLATES/haproxy-client.cfg.in" "$WORK/$scen-a.cfg" MODE="$mode" HTTP_OPTIONS="$opts" \
        LISTEN_PORT="$a_port" UPSTREAM_PORT="$b_port" CERTS="$CERTS"
    render "$TEMPLATES/haproxy-server.cfg.in" "$WORK/$scen-b.cfg" MODE="$mode" HTTP_OPTIONS="$opts" \
        LISTEN_PORT="$b_port" UPSTREAM_PORT="$NGINX_PORT" CERTS="$CERTS"
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
    expect_status "$scen" '!200' "plaintext to haproxy B, bypassing mTLS" "http://127.0.0.1:$b_port$PATH_OK"
    measure "$scen" "$url" "client=$a_pid" "server=$b_pid"
    stop_pid "$a_pid"
    stop_pid "$b_pid"
}

NOTES=()
wanted() { [[ " $ONLY " == *" $1 "* ]]; }
wanted meshward-l4 && meshward_pair meshward-l4 tcp "$WORK/policies-l4" off
wanted meshward-l7 && meshward_pair meshward-l7 http "$WORK/policies-l7" off
wanted meshward-l7-nojwt && meshward_pair meshward-l7-nojwt http "$WORK/policies-l7-nojwt" off no
[[ $ACCESS_LOG_RUN == 1 ]] && wanted meshward-l7-log && meshward_pair meshward-l7-log http "$WORK/policies-l7" on
wanted haproxy-tcp && haproxy_pair haproxy-tcp tcp
wanted haproxy-http && haproxy_pair haproxy-http http

# --- report ------------------------------------------------------------------------

ratio() { awk -v a="$1" -v b="$2" 'BEGIN { if (b > 0) printf "%.2f", a / b; else printf "-" }'; }
hop_field() { # hops-string index(0|1) field(1=name 2=ticks 3=idle 4=end)
    local h
    read -r -a h <<<"$2"
    ((${#h[@]} > $1)) || { echo "-"; return; }
    echo "${h[$1]}" | cut -d: -f"$3"
}
cpu_per_1k() { # ticks requests
    awk -v t="$1" -v n="$2" -v hz="$CLK_TCK" 'BEGIN { printf "%.4f", (t / hz) / (n / 1000) }'
}
mib() { awk -v k="$1" 'BEGIN { printf "%.1f", k / 1024 }'; }

ROWS=()
for s in "${SCENARIOS[@]}"; do
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
    ROWS+=("$s|$(printf '%.0f' "${R_RPS[$s]}")|$(ratio "${R_RPS[$s]}" "${R_RPS[direct]}")|${R_P50[$s]}|$(ratio "${R_P50[$s]}" "${R_P50[direct]}")|${R_P99[$s]}|$(ratio "${R_P99[$s]}" "${R_P99[direct]}")|${cpu_col[0]}|${cpu_col[1]}|${idle_col[0]}|${idle_col[1]}|${end_col[0]}|${end_col[1]}|${R_OTHER[$s]}")
done

HEADER="scenario|req/s|req/s ÷ direct|p50 ms|p50 ÷ direct|p99 ms|p99 ÷ direct|CPU-s/1k req hop1|CPU-s/1k req hop2|RSS idle MiB hop1|RSS idle MiB hop2|RSS end MiB hop1|RSS end MiB hop2|other CPU %"

echo
echo "== proxy load: wrk -t$THREADS -c$CONNECTIONS -d$DURATION --latency (after a $WARMUP warm-up), $(nproc) cores =="
echo "hop1 = client-side proxy (wrk's side), hop2 = server-side proxy (nginx's side)"
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
echo
echo "- wrk $("$WRK" -v 2>&1 | head -1 | awk '{print $2}'), \`wrk -t$THREADS -c$CONNECTIONS -d$DURATION --latency\`, $WARMUP warm-up, every request with the same \`Authorization: Bearer\` RS256 JWT; backend nginx $("$NGINX" -v 2>&1 | sed 's/.*nginx\///'), 1 worker, \`return 200 \"ok\\n\"\`."
echo "- meshward $("$MESHWARD" --version 2>/dev/null | awk '{print $NF}') (\`$MESHWARD\`; repository at $(git -C "$REPO" rev-parse --short HEAD 2>/dev/null || echo unknown)), \`--access-log off --audit-log off\` except meshward-l7-log (access logs to files); haproxy $("$HAPROXY" -v | head -1 | awk '{print $3}') with default threads."
echo "- Identity checks: meshward's client side accepts only the server's SPIFFE ID (secure naming) and the server side allows only the client's principal (L4: per connection; L7: per request, with GET + /bench/* and, in meshward-l7, a verified RS256 JWT); haproxy verifies both chains against the mesh root but checks no SPIFFE ID."
echo "- other CPU %: busy CPU time during the measured phase not spent by wrk, nginx, meshward server or the hops (other processes, interrupts, hypervisor steal), as % of the machine; more than a few % means the row is skewed."
echo "- CPU per hop: utime+stime of that proxy process during the measured phase, ÷ (requests ÷ 1,000). RSS: VmRSS before any load and right after it."
echo "- $(nproc) cores, $(grep -m1 'model name' /proc/cpuinfo | cut -d: -f2 | sed 's/^ //'); CPU ${BUSY_BEFORE}% busy in the second before the run (anything else running skews the numbers). wrk, nginx and both proxies share the cores."
for n in "${NOTES[@]}"; do echo "- $n"; done
for s in "${SCENARIOS[@]}"; do
    if ((${R_OTHER[$s]} > 10)); then
        echo "- WARNING: $s ran while ${R_OTHER[$s]}% of the machine went to other work: its numbers are skewed; run again on a quiet machine."
        log "WARNING: $s: other CPU ${R_OTHER[$s]}%"
    fi
done
