#!/usr/bin/env bash
# Strait and linkerd2-proxy side by side, in one run, on one harness.
#
#   bash bench/against-linkerd.sh [--duration 15] [--reps 3] [--phases "h1 h2 rate close tcp"]
#
# One network namespace (`svl-<pid>`, addresses 10.0.0.1/10.0.0.2 on its loopback), one nginx
# (1 worker, a 1 KiB body), one TCP echo server (`strait-testapp echo`), and three ways to them,
# measured alternately (direct, linkerd2-proxy, Strait) in every repetition:
#   direct          ports 9080 (HTTP/1.1) / 9081 (h2c) / 9082 (TCP echo), never redirected
#   linkerd2-proxy  ports 8080 / 8081 / 8082: client proxy (uid 2103) -> server proxy (uid 2102)
#   Strait          ports 8090 / 8091 / 8092: client proxy (uid 2105) -> server proxy (uid 2104)
# Both pairs: mTLS between the proxies (checked in their metrics before measuring), one runtime
# thread each (LINKERD2_PROXY_CORES=1, STRAIT_THREADS=1), iptables REDIRECT by uid, the
# linkerd2-proxy binary and its stand-in control plane from ../shared/anchors/linkerd2-proxy.
# Phases: h1 (wrk -t1 -c16 and -c64), h2 (h2load -c4 -m10), rate (open-loop fixed rate, 8
# connections, 500 and 2000 req/s: added latency), close (wrk -c16, Connection: close), tcp
# (opaque TCP request/response: `strait-bench tcp-rr`, 16 connections each sending 64 bytes and
# waiting for their echo; both proxies find it is not HTTP by their protocol detection), and,
# only when asked, syscalls (strace -c of each proxy over 20,000 HTTP/1.1 requests, -c16) and
# profile (perf record of each proxy during wrk -c16; reports left in the work directory).
# Prints a table (medians with min-max) and `<key> <value>` lines. Everything it starts is
# stopped by PID and the namespace deleted on exit. Needs release binaries (bench/run.sh
# builds them) and wrk, h2load, nginx, openssl (scripts/setup.sh --bench).
set -euo pipefail
ROOT=$(cd "$(dirname "$0")/.." && pwd)
BIN=${STRAIT_BIN_DIR:-$ROOT/target/release}
ANCHOR=${ANCHOR:-$ROOT/../shared/anchors/linkerd2-proxy}
D=15; REPS=3; PHASES="h1 h2 rate close tcp"
while [ $# -gt 0 ]; do
  case $1 in
    --duration) D=${2%s}; shift 2;;
    --reps) REPS=$2; shift 2;;
    --phases) PHASES=$2; shift 2;;
    *) echo "unknown argument $1" >&2; exit 2;;
  esac
done
[ "$D" -ge 1 ] && [ "$D" -le 120 ] || { echo "--duration must be 1..120 s" >&2; exit 2; }
[ "$REPS" -ge 1 ] && [ "$REPS" -le 15 ] || { echo "--reps must be 1..15" >&2; exit 2; }
for b in strait strait-proxy strait-control-plane strait-bench strait-testapp; do
  [ -x "$BIN/$b" ] || { echo "no $BIN/$b: cargo build --release --workspace --bins" >&2; exit 1; }
done
for t in wrk h2load nginx openssl setpriv python3; do
  command -v $t >/dev/null || { echo "$t is missing (bash scripts/setup.sh --bench)" >&2; exit 1; }
done

W=$(mktemp -d /tmp/strait-vs-linkerd.XXXXXX)
NS=svl-$$
N="ip netns exec $NS"
PIDS=()
cleanup() {
  for p in "${PIDS[@]}"; do kill "$p" 2>/dev/null || true; done
  [ -f "$W/nginx.pid" ] && kill -QUIT "$(cat "$W/nginx.pid")" 2>/dev/null || true
  sleep 0.5
  for p in "${PIDS[@]}"; do kill -9 "$p" 2>/dev/null || true; done
  ip netns del "$NS" 2>/dev/null || true
}
trap cleanup EXIT INT TERM
echo "work dir $W, namespace $NS" >&2

# Binaries of the anchor.
gunzip -c "$ANCHOR/linkerd2-proxy.gz" > "$W/linkerd2-proxy"
gunzip -c "$ANCHOR/l2p-stub.gz" > "$W/l2p-stub"
chmod 755 "$W/linkerd2-proxy" "$W/l2p-stub"

# The namespace, and redirection by uid (each client proxy's own connections go to its peer's
# inbound port; the application's connections to the pair's ports go to its client proxy).
ip netns add "$NS"
ip -n "$NS" link set lo up
ip -n "$NS" addr add 10.0.0.1/32 dev lo
ip -n "$NS" addr add 10.0.0.2/32 dev lo
$N sysctl -qw net.ipv4.ip_local_port_range="10000 65000" net.ipv4.tcp_tw_reuse=1 net.core.somaxconn=4096
X="$N iptables -t nat"
$X -N SVL_OUT
$X -A OUTPUT -p tcp -j SVL_OUT
$X -A SVL_OUT -m owner --uid-owner 2103 -p tcp -d 10.0.0.2 -m multiport --dports 8080,8081,8082 -j REDIRECT --to-ports 4143
$X -A SVL_OUT -m owner --uid-owner 2102 -j RETURN
$X -A SVL_OUT -m owner --uid-owner 2103 -j RETURN
$X -A SVL_OUT -p tcp -d 10.0.0.2 -m multiport --dports 8080,8081,8082 -j REDIRECT --to-ports 4140
# Strait sends opaque TCP to its peer's mesh port (the inbound port, the same on every proxy:
# 4243 here), dialing <pod IP>:4243; in one namespace the client proxy binds that port on
# 10.0.0.1 and the server proxy on 127.0.0.1, where REDIRECT delivers.
$X -A SVL_OUT -m owner --uid-owner 2105 -p tcp -d 10.0.0.2 -m multiport --dports 8090,8091,8092,4243 -j REDIRECT --to-ports 4243
$X -A SVL_OUT -m owner --uid-owner 2104 -j RETURN
$X -A SVL_OUT -m owner --uid-owner 2105 -j RETURN
$X -A SVL_OUT -p tcp -d 10.0.0.2 -m multiport --dports 8090,8091,8092 -j REDIRECT --to-ports 4240

# nginx: one worker, the same server for the three ways.
mkdir -p "$W/www"
head -c 1024 /dev/zero | tr '\0' x > "$W/www/index.html"
cat > "$W/nginx.conf" <<EOF
worker_processes 1;
pid $W/nginx.pid;
error_log $W/nginx-error.log warn;
events { worker_connections 8192; }
http {
  access_log off;
  keepalive_requests 10000000;
  keepalive_timeout 300s;
  open_file_cache max=16 inactive=600s;
  default_type text/plain;
  server {
    listen 10.0.0.2:8080 reuseport backlog=4096;
    listen 10.0.0.2:8090 reuseport backlog=4096;
    listen 10.0.0.2:9080 reuseport backlog=4096;
    root $W/www;
    location / { index index.html; }
  }
  server {
    listen 10.0.0.2:8081 http2 backlog=4096;
    listen 10.0.0.2:8091 http2 backlog=4096;
    listen 10.0.0.2:9081 http2 backlog=4096;
    http2_max_concurrent_streams 256;
    root $W/www;
    location / { index index.html; }
  }
}
EOF
$N nginx -c "$W/nginx.conf"
# The TCP echo server, one process for the three ways.
for port in 8082 8092 9082; do
  $N "$BIN/strait-testapp" echo --listen 10.0.0.2:$port > "$W/echo-$port.log" 2>&1 &
  PIDS+=($!)
done

# linkerd2-proxy's PKI: a test CA; per proxy a key, a CSR and a token for the stub.
C=$W/certs; mkdir -p "$C"
(
  cd "$C"
  openssl ecparam -name prime256v1 -genkey -noout -out ca.key 2>/dev/null
  openssl req -x509 -new -key ca.key -sha256 -days 2 -subj "/CN=root.linkerd.cluster.local" \
    -addext "basicConstraints=critical,CA:TRUE" -addext "keyUsage=critical,keyCertSign,cRLSign" -out ca.pem 2>/dev/null
  for who in client server; do
    name=$who.default.serviceaccount.identity.linkerd.cluster.local
    mkdir -p $who
    openssl ecparam -name prime256v1 -genkey -noout -out $who/key.pem 2>/dev/null
    openssl pkcs8 -topk8 -nocrypt -in $who/key.pem -outform DER -out $who/key.p8
    openssl req -new -key $who/key.pem -subj "/CN=$name" -addext "subjectAltName=DNS:$name" -outform DER -out $who/csr.der 2>/dev/null
    # The stub answers Certify with this leaf.
    printf '%s\n' "subjectAltName=DNS:$name" "extendedKeyUsage=serverAuth,clientAuth" \
      "keyUsage=critical,digitalSignature" "basicConstraints=critical,CA:FALSE" > $who/ext.cnf
    openssl x509 -req -inform DER -in $who/csr.der -CA ca.pem -CAkey ca.key -CAcreateserial -days 2 \
      -sha256 -extfile $who/ext.cnf -outform DER -out $who/crt.der 2>/dev/null
    echo "token-$who" > $who/token.txt
  done
)
chmod -R a+rX "$W"
ID=.default.serviceaccount.identity.linkerd.cluster.local
$N "$W/l2p-stub" 127.0.0.1:8086 "$C" 10.0.0.2:8080=server$ID 10.0.0.2:8081=server$ID 10.0.0.2:8082=server$ID > "$W/stub.log" 2>&1 &
PIDS+=($!)

# Strait's PKI and local-mode mesh: service "web" whose endpoint is 10.0.0.2 (pod "server").
"$BIN/strait" identity init --dir "$W/strait-ca" > /dev/null
mkdir -p "$W/mesh"
cat > "$W/mesh/web.yaml" <<'EOF'
apiVersion: v1
kind: Service
metadata: {name: web, namespace: default}
spec:
  clusterIP: 10.96.0.20
  ports:
  - {name: h1, port: 8090, targetPort: 8090, protocol: TCP}
  - {name: h2, port: 8091, targetPort: 8091, protocol: TCP}
  - {name: tcp, port: 8092, targetPort: 8092, protocol: TCP}
---
apiVersion: discovery.k8s.io/v1
kind: EndpointSlice
metadata:
  name: web-slice
  namespace: default
  labels: {kubernetes.io/service-name: web}
  annotations: {strait.io/service-account: server}
addressType: IPv4
ports:
- {name: h1, port: 8090, protocol: TCP}
- {name: h2, port: 8091, protocol: TCP}
- {name: tcp, port: 8092, protocol: TCP}
endpoints:
- addresses: ["10.0.0.2"]
  conditions: {ready: true}
  targetRef: {kind: Pod, name: server}
---
kind: Pod
metadata: {name: server, namespace: default}
spec: {serviceAccountName: server}
---
kind: Pod
metadata: {name: client, namespace: default}
spec: {serviceAccountName: client}
---
kind: Secret
metadata: {name: server-token, namespace: default, annotations: {kubernetes.io/service-account.name: server}}
type: kubernetes.io/service-account-token
stringData: {token: strait-token-server}
---
kind: Secret
metadata: {name: client-token, namespace: default, annotations: {kubernetes.io/service-account.name: client}}
type: kubernetes.io/service-account-token
stringData: {token: strait-token-client}
EOF
for who in client server; do echo -n "strait-token-$who" > "$W/strait-ca/$who.token"; done
chmod -R a+rX "$W"
$N env -i PATH=/usr/bin:/bin STRAIT_LOG=warn "$BIN/strait-control-plane" \
  --config-dir "$W/mesh" --state-dir "$W/cp-state" --discovery-addr 127.0.0.1:8087 \
  --issuer-cert "$W/strait-ca/issuer.crt" --issuer-key "$W/strait-ca/issuer.key" \
  --trust-anchors "$W/strait-ca/ca.crt" --identity-addr 127.0.0.1:8088 --leaf-lifetime 24h \
  > "$W/strait-cp.log" 2>&1 &
PIDS+=($!)
sleep 1

l2p() { # client|server
  local who=$1 uid extra
  if [ "$who" = client ]; then
    uid=2103
    extra=(LINKERD2_PROXY_OUTBOUND_LISTEN_ADDR=127.0.0.1:4140 LINKERD2_PROXY_INBOUND_LISTEN_ADDR=127.0.0.1:6143
           LINKERD2_PROXY_ADMIN_LISTEN_ADDR=127.0.0.1:4191 LINKERD2_PROXY_DESTINATION_PROFILE_NETWORKS=10.0.0.0/24)
  else
    uid=2102
    extra=(LINKERD2_PROXY_OUTBOUND_LISTEN_ADDR=127.0.0.1:5140 LINKERD2_PROXY_INBOUND_LISTEN_ADDR=0.0.0.0:4143
           LINKERD2_PROXY_ADMIN_LISTEN_ADDR=127.0.0.1:5191 LINKERD2_PROXY_INBOUND_PORTS=8080,8081,8082)
  fi
  $N setpriv --reuid=$uid --regid=$uid --clear-groups env -i PATH=/usr/bin:/bin \
    LINKERD2_PROXY_LOG=warn LINKERD2_PROXY_CORES=1 \
    LINKERD2_PROXY_IDENTITY_TRUST_ANCHORS="$(cat "$C/ca.pem")" \
    LINKERD2_PROXY_IDENTITY_DIR="$C/$who" LINKERD2_PROXY_IDENTITY_TOKEN_FILE="$C/$who/token.txt" \
    LINKERD2_PROXY_IDENTITY_LOCAL_NAME=$who$ID \
    LINKERD2_PROXY_IDENTITY_SVC_ADDR=127.0.0.1:8086 LINKERD2_PROXY_DESTINATION_SVC_ADDR=127.0.0.1:8086 \
    LINKERD2_PROXY_POLICY_SVC_ADDR=127.0.0.1:8086 \
    LINKERD2_PROXY_POLICY_WORKLOAD="{\"ns\":\"default\",\"pod\":\"$who\"}" \
    LINKERD2_PROXY_INBOUND_DEFAULT_POLICY=all-unauthenticated \
    "${extra[@]}" "$W/linkerd2-proxy" > "$W/l2p-$who.log" 2>&1 &
  PIDS+=($!)
}
strait() { # client|server
  local who=$1 uid extra
  if [ "$who" = client ]; then
    uid=2105
    extra=(STRAIT_OUTBOUND_ADDR=127.0.0.1:4240 STRAIT_INBOUND_ADDR=10.0.0.1:4243 STRAIT_ADMIN_ADDR=127.0.0.1:4291)
  else
    uid=2104
    extra=(STRAIT_OUTBOUND_ADDR=127.0.0.1:5240 STRAIT_INBOUND_ADDR=127.0.0.1:4243 STRAIT_ADMIN_ADDR=127.0.0.1:5291)
  fi
  $N setpriv --reuid=$uid --regid=$uid --clear-groups env -i PATH=/usr/bin:/bin \
    STRAIT_LOG=warn STRAIT_THREADS=1 STRAIT_CONTROL_PLANE_ADDR=127.0.0.1:8087 \
    STRAIT_IDENTITY_ADDR=127.0.0.1:8088 STRAIT_TRUST_ANCHORS="$W/strait-ca/ca.crt" \
    STRAIT_IDENTITY_TOKEN_FILE="$W/strait-ca/$who.token" \
    STRAIT_IDENTITY=spiffe://cluster.local/ns/default/sa/$who STRAIT_WORKLOAD=default/$who \
    "${extra[@]}" "$BIN/strait-proxy" run > "$W/strait-$who.log" 2>&1 &
  PIDS+=($!)
}
l2p server; LS=${PIDS[-1]}; l2p client; LC=${PIDS[-1]}
strait server; SS=${PIDS[-1]}; strait client; SC=${PIDS[-1]}
# `ip netns exec` and `setpriv` exec in place: these PIDs are the proxies'.
for port in 8080 8081 8090 8091 9080 9081; do
  proto=$([ $((port % 2)) = 1 ] && echo --http2-prior-knowledge || echo --http1.1)
  for i in $(seq 1 30); do
    $N curl -sf --max-time 5 $proto -o /dev/null "http://10.0.0.2:$port/" && break
    [ "$i" = 30 ] && { echo "no answer on port $port within 30 s; logs in $W" >&2; exit 1; }
    sleep 1
  done
done
# mTLS on both pairs, as their own metrics say.
$N curl -s 127.0.0.1:4191/metrics | grep -q 'tls="true"' || { echo "linkerd2-proxy pair is not using mTLS" >&2; exit 1; }
$N curl -s 127.0.0.1:4291/metrics | grep -q 'server_id="spiffe://cluster.local/ns/default/sa/server"' \
  || { echo "Strait pair is not using mTLS" >&2; exit 1; }

port() { case $1 in direct) echo $(( $2 + 1000 ));; linkerd) echo "$2";; strait) echo $(( $2 + 10 ));; esac; }
ticks() { awk '{print $14+$15}' "/proc/$1/stat"; }
pair() { case $1 in linkerd) echo "$LC $LS";; strait) echo "$SC $SS";; *) echo "";; esac; }
R=$W/results; : > "$R"
run() { # tag mode command...: the command's output to $W/<tag>.out; CPU ticks of the pair to $R
  local tag=$1 mode=$2; shift 2
  local procs before after
  procs=$(pair "$mode")
  before=$(for p in $procs; do ticks "$p"; done | xargs)
  "$@" > "$W/$tag.out" 2>&1 || true
  after=$(for p in $procs; do ticks "$p"; done | xargs)
  echo "$tag $mode before=$before after=$after" >> "$R"
  sleep 1
}
TO=$((D + 20))
profile() { # mode rep: where each proxy of the pair spends its time at max HTTP/1.1 (perf record)
  local mode=$1 r=$2 p perfs=()
  for p in $(pair "$mode"); do
    perf record -q -F "${PERF_FREQ:-1999}" ${PERF_CALLGRAPH:+--call-graph "$PERF_CALLGRAPH"} -p "$p" -o "$W/perf_${mode}_${r}_$p.data" -- sleep "$D" 2>/dev/null & perfs+=($!)
  done
  $N timeout $TO wrk -t1 -c16 -d${D}s http://10.0.0.2:$(port "$mode" 8080)/ > "$W/perf_${mode}_$r.out" 2>&1 || true
  wait "${perfs[@]}" 2>/dev/null || true
  for p in $(pair "$mode"); do
    perf report -q -i "$W/perf_${mode}_${r}_$p.data" --no-children --sort dso,sym ${PERF_CALLGRAPH:+-G} 2>/dev/null \
      | head -${PERF_LINES:-40} > "$W/perf_${mode}_${r}_$p.txt" || true
    echo "profile $mode/$p: $W/perf_${mode}_${r}_$p.txt" >&2
  done
}
syscalls() { # mode rep: system calls per HTTP/1.1 request of each proxy of the pair (strace -c)
  local mode=$1 r=$2 p t args straces=()
  for p in $(pair "$mode"); do
    args=(); for t in /proc/"$p"/task/*; do args+=(-p "${t##*/}"); done
    strace -c -f -o "$W/sys_${mode}_${r}_$p" "${args[@]}" 2>/dev/null & straces+=($!)
  done
  sleep 1
  $N timeout $TO h2load --h1 -n 20000 -c16 http://10.0.0.2:$(port "$mode" 8080)/ > "$W/sys_${mode}_$r.out" 2>&1 || true
  kill -INT "${straces[@]}"; wait "${straces[@]}" 2>/dev/null || true
  for p in $(pair "$mode"); do
    awk -v who="$mode/$p" '$NF ~ /^[a-z_0-9]+$/ && $NF != "total" && $4 ~ /^[0-9]+$/ {c[$NF]=$4; n+=$4}
      END {printf "syscalls %s: %.2f per request:", who, n/20000; for (k in c) if (c[k] >= 2000) printf " %s %.2f", k, c[k]/20000; print ""}' \
      "$W/sys_${mode}_${r}_$p" | tee -a "$W/syscalls" >&2
  done
}
for r in $(seq 1 "$REPS"); do
  for ph in $PHASES; do
    for m in direct linkerd strait; do
      echo "rep $r phase $ph $m" >&2
      case $ph in
        h1) for c in 16 64; do
              run "h1c${c}_${m}_$r" $m $N timeout $TO wrk -t1 -c$c -d${D}s http://10.0.0.2:$(port $m 8080)/
            done;;
        h2) run "h2_${m}_$r" $m $N timeout $TO h2load -c4 -m10 -D $D --warm-up-time=1 http://10.0.0.2:$(port $m 8081)/;;
        rate) for q in 500 2000; do
              run "rate${q}_${m}_$r" $m $N timeout $TO "$BIN/strait-bench" fixed-rate --url http://10.0.0.2:$(port $m 8080)/ --rate $q --conns 8 --duration ${D}s
            done;;
        tcp) run "tcp_${m}_$r" $m $N timeout $TO "$BIN/strait-bench" tcp-rr --addr 10.0.0.2:$(port $m 8082) --duration ${D}s;;
        close) run "close_${m}_$r" $m $N timeout $TO wrk -t1 -c16 -d${D}s -H 'Connection: close' http://10.0.0.2:$(port $m 8080)/;;
        syscalls) [ $m = direct ] || syscalls "$m" "$r";;
        profile) [ $m = direct ] || profile "$m" "$r";;
      esac
    done
  done
done
memory() { # field of /proc/<pid>/status, file: the four proxies' values in kB, on one line
  for p in "$SC" "$SS" "$LC" "$LS"; do awk -v f="$1:" '$1 == f {printf "%s ", $2}' "/proc/$p/status"; done > "$W/$2"
}
# RSS, and its private part (heap, stacks): RSS less the executable's pages, which the page
# cache shares between every process of the same binary.
memory VmRSS rss_kb; memory RssAnon anon_kb
# The same after 12 s without load: what stays once each proxy's allocator has settled
# (linkerd2-proxy's jemalloc returns freed memory over about 10 s, Strait's memory task looks
# every 10 s).
sleep 12
memory VmRSS rss_idle_kb; memory RssAnon anon_idle_kb
# Each proxy's mappings after load (what its RSS is made of), for whoever wants to look.
for p in "$SC" "$SS" "$LC" "$LS"; do cat "/proc/$p/smaps" > "$W/smaps.$p" 2>/dev/null || true; done

python3 - "$W" "$(getconf CLK_TCK)" "$D" <<'EOF'
import re, statistics, sys, os
W, hz, D = sys.argv[1], int(sys.argv[2]), float(sys.argv[3])
def out(tag):
    p = os.path.join(W, tag + ".out")
    return open(p).read() if os.path.exists(p) else ""
def reqs(tag):
    t = out(tag)
    m = re.search(r"Requests/sec:\s+([\d.]+)", t)
    if m:
        n = int(re.search(r"(\d+) requests in", t).group(1))
        return float(m.group(1)), n
    m = re.search(r"finished in [\d.]+m?s, ([\d.]+) req/s", t)
    if m:
        n = int(re.search(r"requests: \d+ total, \d+ started, (\d+) done", t).group(1))
        return float(m.group(1)), n
    m = re.search(r"requests=(\d+) errors=(\d+)", t)
    if m:
        # tcp-rr: a rate only when no connection failed.
        n = int(m.group(1))
        return (n / D if int(m.group(2)) == 0 else None), n
    return None, 0
def lat(tag, key):
    m = re.search(key + r"=(\d+)", out(tag))
    return int(m.group(1)) / 1000.0 if m else None
cpu = {}
for line in open(os.path.join(W, "results")):
    tag, mode, b, a = line.split(" ", 3)
    b = [int(x) for x in b.split("=")[1].split()] if "=" in b else []
    a = [int(x) for x in a.split("=")[1].split()] if "=" in a else []
    cpu[tag] = [(y - x) / hz for x, y in zip(b, a)]
tags = sorted({l.split()[0] for l in open(os.path.join(W, "results"))})
def series(prefix, mode, f):
    vals = []
    for t in tags:
        if re.fullmatch(prefix + "_" + mode + r"_\d+", t):
            v = f(t)
            if v is not None:
                vals.append(v)
    return vals
def med(v): return statistics.median(v) if v else float("nan")
def rng(v): return "%s-%s" % (fmt(min(v)), fmt(max(v))) if v else "-"
def fmt(x):
    return "%.0f" % x if abs(x) >= 100 else "%.2f" % x
def cpu_us(t):
    r, n = reqs(t)
    c = cpu.get(t)
    if not c or not n: return None
    return sum(c) / len(c) / n * 1e6
rows, keys = [], {}
def row(name, prefix, f, key=None, lower_better=False):
    d, l, s = (series(prefix, m, f) for m in ("direct", "linkerd", "strait"))
    ratio = med(s) / med(l) if l and s and med(l) else float("nan")
    rows.append((name, d, l, s, ratio))
    if key: keys[key] = ratio
    return d, l, s
rps = lambda t: reqs(t)[0]
if any(t.startswith("h1c16") for t in tags):
    row("HTTP/1.1 wrk -c16 (req/s)", "h1c16", rps, "vs_linkerd_h1_c16")
    row("HTTP/1.1 wrk -c64 (req/s)", "h1c64", rps, "vs_linkerd_h1_c64")
    row("CPU per request per proxy, max HTTP/1.1 -c16 (us)", "h1c16", cpu_us, "vs_linkerd_cpu_max")
if any(t.startswith("h2_") for t in tags):
    row("h2c h2load -c4 -m10 (req/s)", "h2", rps, "vs_linkerd_h2c")
if any(t.startswith("close_") for t in tags):
    row("HTTP/1.1 Connection: close (req/s)", "close", rps, "vs_linkerd_close")
if any(t.startswith("rate") for t in tags):
    for q in (500, 2000):
        for p, k in (("p50_us", "p50"), ("p99_us", "p99"), ("p999_us", "p99.9")):
            d = med(series("rate%d" % q, "direct", lambda t: lat(t, p)))
            added = lambda mode: [x - d for x in series("rate%d" % q, mode, lambda t: lat(t, p))]
            l, s = added("linkerd"), added("strait")
            ratio = med(s) / med(l) if l and s and med(l) > 0 else float("nan")
            rows.append(("added %s at %d req/s (ms)" % (k, q), [], l, s, ratio))
            if k != "p50":
                keys["vs_linkerd_added_%s_%d" % (k.replace(".", ""), q)] = ratio
        row("CPU per request per proxy at %d req/s (us)" % q, "rate%d" % q, cpu_us,
            "vs_linkerd_cpu_%d" % q)
if any(t.startswith("tcp_") for t in tags):
    d, l, s = row("opaque TCP request/response, 16 x 64 B (exchanges/s)", "tcp", rps, "vs_linkerd_tcp_rr")
    row("CPU per exchange per proxy, opaque TCP (us)", "tcp", cpu_us, "vs_linkerd_cpu_tcp")
    if d and med(d):
        keys["strait_tcp_rr_vs_direct"] = med(s) / med(d) if s else float("nan")
        keys["linkerd_tcp_rr_vs_direct"] = med(l) / med(d) if l else float("nan")
# Memory: client proxy, server proxy (Strait), then linkerd2-proxy's two, in MB.
mem = {f: [int(x) / 1024 for x in open(os.path.join(W, f + "_kb")).read().split()]
       for f in ("rss", "anon", "rss_idle", "anon_idle")}
mem_rows = (("RSS after load", "rss"), ("private memory (RssAnon) after load", "anon"),
            ("RSS 12 s after load", "rss_idle"), ("private memory 12 s after load", "anon_idle"))
print("| measure | direct | linkerd2-proxy | Strait | Strait / linkerd2-proxy |")
print("|---|---|---|---|---|")
for name, d, l, s, ratio in rows:
    cell = lambda v: "%s (%s)" % (fmt(med(v)), rng(v)) if v else "-"
    print("| %s | %s | %s | %s | %.2f |" % (name, cell(d), cell(l), cell(s), ratio))
for name, f in mem_rows:
    m = mem[f]
    print("| %s, client / server proxy (MB) | - | %.1f / %.1f | %.1f / %.1f | %.2f |"
          % (name, m[2], m[3], m[0], m[1], max(m[0], m[1]) / max(m[2], m[3])))
print("(medians of %d runs, (min-max); CPU: user+system of both proxies of the pair / 2 / requests)" % len(series("h1c16", "strait", rps) or [0]))
print()
for k, v in keys.items():
    print("%s %.3f" % (k, v))
for f in ("rss", "anon", "rss_idle", "anon_idle"):
    m = mem[f]
    print("strait_%s_mb %.1f" % (f, max(m[0], m[1])))
    print("linkerd_%s_mb %.1f" % (f, max(m[2], m[3])))
EOF
