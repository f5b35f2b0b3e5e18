#!/usr/bin/env bash
# The HTTP stage against the inspecting proxies a user would otherwise run, in one lab run:
# Waygate inspecting (tls_decrypt = true), Squid ssl-bump (Debian squid-openssl) and mitmdump
# (mitmproxy from PyPI), all in front of the same HTTPS origin, 1 KiB responses.
#
#   scripts/bench-http.sh            (as root; installs what it needs, builds the release binaries)
#
# Every proxy sees the same device: a wg-quick + wireguard-go tunnel from <P>d1 to the gateway
# namespace (scripts/bench-lib.sh), and h2load (nghttp2-client, HTTP/1.1, no certificate checks)
# in the device asks for https://origin.example/1k as a browser would, without knowing a proxy is
# there. Squid and mitmdump run transparently (intercepting), like Waygate: the reference
# gateway (wireguard-go + kernel forwarding) gets an nftables REDIRECT of the device's ports 8080
# and 443 to Squid's `intercept` ports and to mitmdump's transparent mode. That is the fair
# comparison: the same client, the same connections and TLS handshakes from the device, and each
# proxy makes its own connection to the origin. Explicit-proxy mode would add a CONNECT round
# trip for Squid and mitmdump that Waygate does not pay.
#
# CPU is user + system time from /proc/PID/stat over each load run: for Waygate its one process,
# which also runs WireGuard and the device-side TCP stack; for Squid every process of its tree
# (the squid process and its certificate helpers); for mitmdump its process. The reference
# gateway's wireguard-go is NOT counted against Squid or mitmdump (it is shown as "tunnel"), so
# the per-CPU-second comparison is conservative for Waygate.
#
# Origin: nginx from Debian (one worker) in the Internet namespace at 203.0.113.40, ports 443
# and 8080 (plain HTTP: the lab's own origin holds port 80 there, so Waygate's http.ports names
# 8080), with a certificate from a lab CA that every proxy trusts (Waygate's `http.upstream_ca`,
# Squid's tls_outgoing_options cafile, mitmdump's ssl_verify_upstream_trusted_ca). lab-https is a
# single-threaded test origin without static files; nginx's CPU is printed per row so a reader
# can see it is not the bottleneck.
#
# Rows:
#   keep-alive   HTTPS, 16 connections kept alive, requests/s
#   new-conn     HTTPS, one request per connection (one TLS handshake per request)
#   plain-http   HTTP, 16 keep-alive connections
#   download     1 GiB over HTTPS through Waygate, inspected and Do Not Inspect (an `off` rule for
#                bypass.example, same origin), goodput by curl
#   idle         Waygate's RSS before and with 1,000 idle inspected HTTPS connections (each made
#                one request, then stays open)
#
# Env: BENCH_SECONDS (default 8) per load run; BENCH_PREFIX lab prefix; BENCH_MITM_VENV a
# mitmproxy venv to reuse (default: created under the run's work dir); BENCH_ONLY a space
# separated subset of "waygate squid mitmdump" (for profiling; the targets need all three);
# BENCH_WAYGATE another waygate binary (a before/after comparison); BENCH_NEWCONN_RATE
# (default 1000) new connections a second offered in the new-conn row; BENCH_ROWS a space
# separated subset of "keep-alive new-conn plain-http download idle" (default all; for quick
# before/after runs, e.g. BENCH_ONLY=waygate BENCH_ROWS="keep-alive idle").
set -Eeuo pipefail
# shellcheck source=scripts/bench-lib.sh
source "$(dirname "${BASH_SOURCE[0]}")/bench-lib.sh"
SECS="${BENCH_SECONDS:-8}"
ONLY="${BENCH_ONLY:-waygate squid mitmdump}"
ROWS="${BENCH_ROWS:-keep-alive new-conn plain-http download idle}"
# want ROW: whether ROW is to be measured.
want() { [[ " $ROWS " == *" $1 "* ]]; }
ORIGIN_IP=203.0.113.40
CONNS=16

need_pkg() { # COMMAND PACKAGE
  command -v "$1" >/dev/null && return 0
  [ "$(id -u)" -eq 0 ] || bench_die "missing $1 (apt-get install $2)"
  DEBIAN_FRONTEND=noninteractive apt-get install -y --no-install-recommends "$2" >/dev/null \
    || bench_die "cannot install $2"
}
need_pkg h2load nghttp2-client
need_pkg squid squid-openssl
need_pkg nginx nginx-light
need_pkg openssl openssl
need_pkg curl curl

bench_init bench-http
# Squid drops root and must read its certificates here.
chmod 755 "$WORK"

# ---- certificates: the origin's lab CA, Squid's CA -------------------------------------------
ec_ca() { # NAME CN
  openssl req -x509 -newkey ec -pkeyopt ec_paramgen_curve:P-256 -nodes -days 30 -subj "/CN=$2" \
    -keyout "$WORK/$1.key" -out "$WORK/$1.pem" -addext basicConstraints=critical,CA:TRUE \
    -addext keyUsage=critical,keyCertSign,cRLSign 2>/dev/null
}
ec_ca labca "Waygate bench lab CA"
openssl req -newkey ec -pkeyopt ec_paramgen_curve:P-256 -nodes -subj "/CN=origin.example" \
  -keyout "$WORK/origin.key" -out "$WORK/origin.csr" 2>/dev/null
openssl x509 -req -in "$WORK/origin.csr" -CA "$WORK/labca.pem" -CAkey "$WORK/labca.key" \
  -CAcreateserial -days 30 -out "$WORK/origin.pem" 2>/dev/null \
  -extfile <(printf 'subjectAltName=DNS:origin.example,DNS:bypass.example,IP:%s\n' "$ORIGIN_IP")
ec_ca squidca "Squid bench CA"
cat "$WORK/squidca.pem" "$WORK/squidca.key" >"$WORK/squidca.both"
chmod 644 "$WORK"/*.pem "$WORK"/*.key "$WORK/squidca.both"

# Names the device and the proxies resolve without DNS (ip netns exec mounts these hosts files).
for n in "${P}d1" "${P}gw"; do
  printf '%s origin.example bypass.example\n127.0.0.1 localhost\n' "$ORIGIN_IP" >"/etc/netns/$n/hosts"
done
cp "/etc/netns/${P}gw/hosts" "$WORK/hosts"

# ---- origin: nginx ------------------------------------------------------------------------
mkdir -p "$WORK/www" "$WORK/nginx"
head -c 1024 /dev/urandom >"$WORK/www/1k"
truncate -s 1G "$WORK/www/1g"
cat >"$WORK/nginx/nginx.conf" <<EOT
daemon off;
user root;
worker_processes 1;
pid $WORK/nginx/nginx.pid;
error_log $WORK/nginx/error.log warn;
events { worker_connections 8192; }
http {
  access_log off;
  sendfile on;
  keepalive_requests 10000000;
  keepalive_timeout 600s;
  client_body_temp_path $WORK/nginx/body;
  proxy_temp_path $WORK/nginx/proxy;
  fastcgi_temp_path $WORK/nginx/fastcgi;
  uwsgi_temp_path $WORK/nginx/uwsgi;
  scgi_temp_path $WORK/nginx/scgi;
  server {
    listen $ORIGIN_IP:8080;
    listen $ORIGIN_IP:443 ssl;
    ssl_certificate $WORK/origin.pem;
    ssl_certificate_key $WORK/origin.key;
    ssl_session_cache shared:bench:10m;
    root $WORK/www;
  }
}
EOT
ip netns exec "${P}in" ip addr add "$ORIGIN_IP/32" dev lo
ip netns exec "${P}in" bash -c "ulimit -n 65536; exec nginx -c '$WORK/nginx/nginx.conf'" \
  >"$WORK/nginx/out.log" 2>&1 &
NGINX_PID=$!
"$LAB" record-pid "$P" "$NGINX_PID" nginx
for _ in $(seq 1 100); do
  ip netns exec "${P}in" ss -Hlnt | grep -q "$ORIGIN_IP:443" && break
  sleep 0.1
done
ip netns exec "${P}in" curl -sf --cacert "$WORK/labca.pem" --resolve "origin.example:443:$ORIGIN_IP" \
  -o /dev/null https://origin.example/1k || bench_die "nginx does not serve: $(cat "$WORK/nginx/error.log")"

# tree_ticks PID...: user + system ticks of the PIDs and all their descendants.
tree_ticks() {
  local all=() p kids
  local queue=("$@")
  while [ ${#queue[@]} -gt 0 ]; do
    p="${queue[0]}"
    queue=("${queue[@]:1}")
    all+=("$p")
    kids="$(pgrep -P "$p" || true)"
    # shellcheck disable=SC2206
    [ -z "$kids" ] || queue+=($kids)
  done
  local sum=0 t
  for p in "${all[@]}"; do
    t="$(awk '{print $14 + $15}' "/proc/$p/stat" 2>/dev/null || echo 0)"
    sum=$((sum + t))
  done
  echo "$sum"
}

# load NAME ROW URL [h2load args]: one h2load run from the device; appends a result line.
# PROXY_PIDS are the proxy's processes, TUNNEL_PID the gateway's WireGuard when separate.
load() {
  local name="$1" row="$2" url="$3"
  shift 3
  local c0 t0 o0 c1 t1 o1 out
  # A short warm-up outside the measurement: leaves minted, caches hot.
  ip netns exec "${P}d1" timeout 20 h2load --h1 -c "$CONNS" -t 1 -n 2000 "$url" \
    >/dev/null 2>&1 || true
  c0="$(tree_ticks "${PROXY_PIDS[@]}")"
  t0="$(tree_ticks "${TUNNEL_PID:-$NGINX_PID}")"
  o0="$(tree_ticks "$NGINX_PID")"
  out="$(ip netns exec "${P}d1" timeout $((SECS + 60)) h2load --h1 -t 1 "$@" "$url" 2>&1)" \
    || bench_die "h2load through $name ($row) failed: $out"
  c1="$(tree_ticks "${PROXY_PIDS[@]}")"
  t1="$(tree_ticks "${TUNNEL_PID:-$NGINX_PID}")"
  o1="$(tree_ticks "$NGINX_PID")"
  [ -n "${TUNNEL_PID:-}" ] || { t0=0; t1=0; }
  echo "$out" >"$WORK/h2load-$name-$row.log"
  python3 - "$name" "$row" "$c0" "$c1" "$t0" "$t1" "$o0" "$o1" "$TCK" "$WORK/h2load-$name-$row.log" \
    >>"$WORK/results" <<'PY2'
import re, sys
name, row, c0, c1, t0, t1, o0, o1, tck, log = sys.argv[1:]
out = open(log).read()
m = re.search(r"requests: \d+ total, \d+ started, (\d+) done, (\d+) succeeded", out)
codes = re.search(r"status codes: (\d+) 2xx", out)
took = re.search(r"finished in ([\d.]+)(m?s)", out)
ok = int(m.group(2)) if m else 0
twoxx = int(codes.group(1)) if codes else 0
if ok == 0 or twoxx < ok * 0.99 or not took:
    sys.exit(f"bench-http: {name} {row}: {ok} succeeded, {twoxx} 2xx:\n{out[-2000:]}")
secs = float(took.group(1)) / (1000 if took.group(2) == "ms" else 1)
tck = float(tck)
cpu = (float(c1) - float(c0)) / tck
print(f"{name}\t{row}\t{ok / secs:.1f}\t{cpu:.2f}\t{ok / cpu if cpu else 0:.0f}\t"
      f"{(float(t1) - float(t0)) / tck:.2f}\t{(float(o1) - float(o0)) / tck:.2f}")
PY2
}

# rows NAME [RATE]: the three request rows through whatever the device reaches now. New connections:
# h2load's rate mode opens NEWCONN_RATE connections a second making one request each (with
# `-D`, h2load does not reconnect after a `Connection: close`); RATE overrides it.
NEWCONN_RATE="${BENCH_NEWCONN_RATE:-1000}"
rows() {
  local rate="${2:-$NEWCONN_RATE}"
  if want keep-alive; then
    load "$1" keep-alive "https://origin.example/1k" -c "$CONNS" -D "$SECS"
  fi
  if want new-conn; then
    load "$1" new-conn "https://origin.example/1k" -r $((rate / 10)) --rate-period 100ms \
      -c $((rate * SECS)) -n $((rate * SECS))
  fi
  if want plain-http; then
    load "$1" plain-http "http://origin.example:8080/1k" -c "$CONNS" -D "$SECS"
  fi
}

# ---- Waygate ------------------------------------------------------------------------------
rules_json() {
  cat <<'EOT'
[
  {"id": "22222222-0000-4000-8000-000000000001", "name": "bank-style bypass", "action": "off",
   "enabled": true, "precedence": 1, "filters": ["http"],
   "traffic": "any(http.request.domains[*] == \"bypass.example\")"},
  {"id": "22222222-0000-4000-8000-000000000002", "name": "no admin pages", "action": "block",
   "enabled": true, "precedence": 10, "filters": ["http"],
   "traffic": "http.request.uri.path matches \"^/admin\""}
]
EOT
}

if [[ " $ONLY " == *" waygate "* ]]; then
  rules_json >"$WORK/rules.json"
  if [ -n "${BENCH_WAYGATE:-}" ]; then WAYGATE="$BENCH_WAYGATE"; fi
  waygate_up "" "$(printf '[policy]\nrules = "%s"\n[http]\nports = [443, 8080]\ntls_decrypt = true\nupstream_ca = "%s"\n' \
    "$WORK/rules.json" "$WORK/labca.pem")"
  "$WAYGATE" --config "$WORK/gw.toml" ca show >"$WORK/waygate-ca.pem"
  PROXY_PIDS=("$GW_PID")
  TUNNEL_PID=""
  echo "bench-http: waygate (pid $GW_PID), ${SECS}s per run" >&2
  rows waygate

  # 1 GiB inspected vs Do Not Inspect: the same origin file, names that differ by the rule.
  DOWNLOADS=("inspected:origin.example:$WORK/waygate-ca.pem" "off:bypass.example:$WORK/labca.pem")
  want download || DOWNLOADS=()
  for row in "${DOWNLOADS[@]}"; do
    IFS=: read -r label host ca <<<"$row"
    c0="$(cpu_ticks "$GW_PID")"
    speed="$(ip netns exec "${P}d1" curl -sS --fail --cacert "$ca" -o /dev/null \
      -w '%{speed_download}' "https://$host/1g")" || bench_die "download ($label) failed"
    c1="$(cpu_ticks "$GW_PID")"
    echo "download	$label	$speed	$(((c1 - c0)))" >>"$WORK/downloads"
  done

  if want idle; then
    # 1,000 idle inspected connections: each makes one request, then all stay open.
    rss() { awk '/^VmRSS/ {print $2}' "/proc/$GW_PID/status"; }
    rss0="$(rss)"
    ip netns exec "${P}d1" python3 - "$WORK/waygate-ca.pem" 1000 "$WORK/idle.ready" \
      >"$WORK/idle.log" 2>&1 <<'PY' &
import resource, socket, ssl, sys, time
ca, n, ready = sys.argv[1], int(sys.argv[2]), sys.argv[3]
resource.setrlimit(resource.RLIMIT_NOFILE, (n + 100, n + 100))
ctx = ssl.create_default_context(cafile=ca)
held = []
for i in range(n):
    s = ctx.wrap_socket(socket.create_connection(("origin.example", 443), timeout=20),
                        server_hostname="origin.example")
    s.sendall(b"GET /1k HTTP/1.1\r\nHost: origin.example\r\n\r\n")
    got = b""
    while b"\r\n\r\n" not in got:
        got += s.recv(4096)
    if not got.startswith(b"HTTP/1.1 200"):
        sys.exit(f"connection {i}: {got[:40]!r}")
    held.append(s)
open(ready, "w").write(str(len(held)))
time.sleep(600)
PY
    IDLE_PID=$!
    "$LAB" record-pid "$P" "$IDLE_PID" idle-client
    for _ in $(seq 1 600); do
      [ -f "$WORK/idle.ready" ] && break
      kill -0 "$IDLE_PID" 2>/dev/null || bench_die "idle client failed: $(cat "$WORK/idle.log")"
      sleep 0.2
    done
    [ -f "$WORK/idle.ready" ] || bench_die "1,000 connections did not open in 120 s"
    sleep 2
    rss1="$(rss)"
    echo "idle	$rss0	$rss1	$(cat "$WORK/idle.ready")" >"$WORK/idle"
    kill "$IDLE_PID" 2>/dev/null || true
    wait "$IDLE_PID" 2>/dev/null || true
  fi
  waygate_down
fi

# ---- the competitors behind the reference gateway ---------------------------------------------
if [[ " $ONLY " == *" squid "* || " $ONLY " == *" mitmdump "* ]]; then
  reference_up
  TUNNEL_PID="$GW_PID"
  # redirect_to PORT80 PORT443: the device's web traffic to a local proxy (Squid/mitmdump).
  redirect_to() {
    ip netns exec "${P}gw" nft delete table ip benchredir 2>/dev/null || true
    ip netns exec "${P}gw" nft -f - <<EOT
table ip benchredir {
  chain pre {
    type nat hook prerouting priority dstnat;
    iifname "${P}r" tcp dport 8080 redirect to :$1
    iifname "${P}r" tcp dport 443 redirect to :$2
  }
}
EOT
  }
fi

if [[ " $ONLY " == *" squid "* ]]; then
  mkdir -p "$WORK/squid"
  /usr/lib/squid/security_file_certgen -c -s "$WORK/squid/ssldb" -M 16MB >/dev/null
  chown -R proxy:proxy "$WORK/squid"
  cat >"$WORK/squid/squid.conf" <<EOT
http_port 3128
http_port 3129 intercept
https_port 3130 intercept ssl-bump tls-cert=$WORK/squidca.both generate-host-certificates=on dynamic_cert_mem_cache_size=16MB
sslcrtd_program /usr/lib/squid/security_file_certgen -s $WORK/squid/ssldb -M 16MB
sslcrtd_children 5
acl step1 at_step SslBump1
ssl_bump peek step1
ssl_bump bump all
tls_outgoing_options cafile=$WORK/labca.pem
http_access allow all
cache deny all
cache_mem 8 MB
access_log none
cache_store_log none
cache_log $WORK/squid/cache.log
pid_filename $WORK/squid/squid.pid
coredump_dir $WORK/squid
hosts_file $WORK/hosts
dns_nameservers 203.0.113.53
shutdown_lifetime 1 seconds
max_filedescriptors 65536
EOT
  ip netns exec "${P}gw" squid -N -f "$WORK/squid/squid.conf" >"$WORK/squid/out.log" 2>&1 &
  SQUID_PID=$!
  "$LAB" record-pid "$P" "$SQUID_PID" squid
  for _ in $(seq 1 100); do
    ip netns exec "${P}gw" ss -Hlnt | grep -q ":3130 " && break
    sleep 0.1
  done
  redirect_to 3129 3130
  ip netns exec "${P}d1" curl -sSf -k -o /dev/null https://origin.example/1k \
    || bench_die "no page through squid: $(tail -5 "$WORK/squid/cache.log")"
  PROXY_PIDS=("$SQUID_PID")
  echo "bench-http: squid (pid $SQUID_PID)" >&2
  rows squid
  kill "$SQUID_PID" 2>/dev/null || true
  wait "$SQUID_PID" 2>/dev/null || true
fi

if [[ " $ONLY " == *" mitmdump "* ]]; then
  VENV="${BENCH_MITM_VENV:-$WORK/mitm-venv}"
  if [ ! -x "$VENV/bin/mitmdump" ]; then
    echo "bench-http: installing mitmproxy from PyPI into $VENV" >&2
    python3 -m venv "$VENV"
    "$VENV/bin/pip" install -q mitmproxy || bench_die "pip install mitmproxy failed"
  fi
  ip netns exec "${P}gw" "$VENV/bin/mitmdump" --mode transparent --listen-port 8081 -q \
    --set confdir="$WORK/mitm" --set ssl_verify_upstream_trusted_ca="$WORK/labca.pem" \
    >"$WORK/mitm.log" 2>&1 &
  MITM_PID=$!
  "$LAB" record-pid "$P" "$MITM_PID" mitmdump
  for _ in $(seq 1 200); do
    ip netns exec "${P}gw" ss -Hlnt | grep -q ":8081 " && break
    sleep 0.1
  done
  redirect_to 8081 8081
  ip netns exec "${P}d1" curl -sSf -k -o /dev/null https://origin.example/1k \
    || bench_die "no page through mitmdump: $(tail -5 "$WORK/mitm.log")"
  PROXY_PIDS=("$MITM_PID")
  echo "bench-http: mitmdump (pid $MITM_PID)" >&2
  # mitmdump completes far fewer handshakes a second: offered 1,000 it queues for minutes.
  rows mitmdump 200
  kill "$MITM_PID" 2>/dev/null || true
  wait "$MITM_PID" 2>/dev/null || true
fi

echo "load average: $(cut -d' ' -f1-3 /proc/loadavg)"
python3 - "$WORK/results" "$WORK/downloads" "$WORK/idle" "$SECS" "$CONNS" <<'PY'
import os, sys
results, downloads, idle, secs, conns = sys.argv[1:]
rows = {}
for line in open(results) if os.path.exists(results) else []:
    name, row, rps, cpu, per, tunnel, origin = line.rstrip("\n").split("\t")
    rows.setdefault(row, {})[name] = (float(rps), float(cpu), float(per), float(tunnel), float(origin))
print(f"h2load --h1, 1 KiB responses, {secs} s per row; CPU-s = the proxy's user+system time")
print(f"{'row':<11} {'proxy':<9} {'req/s':>9} {'CPU-s':>7} {'req/CPU-s':>10} {'tunnel CPU-s':>12} {'origin CPU-s':>12}")
for row, by in rows.items():
    for name, (rps, cpu, per, tunnel, origin) in by.items():
        t = f"{tunnel:.2f}" if name != "waygate" else "(in proxy)"
        print(f"{row:<11} {name:<9} {rps:>9.1f} {cpu:>7.2f} {per:>10.0f} {t:>12} {origin:>12.2f}")
checks = []
def ratio(row, a, b):
    by = rows.get(row, {})
    if a in by and b in by and by[b][2]:
        return by[a][2] / by[b][2]
    return None
for row, other, want in [("keep-alive", "squid", 1.0), ("keep-alive", "mitmdump", 10.0),
                         ("new-conn", "squid", 1.5)]:
    r = ratio(row, "waygate", other)
    if r is not None:
        checks.append((f"{row} req/CPU-s waygate/{other} >= {want}", r, r >= want))
if os.path.exists(downloads):
    d = {}
    for line in open(downloads):
        _, label, speed, ticks = line.split("\t")
        d[label] = float(speed) * 8 / 1e9
    print(f"download 1 GiB via waygate: inspected {d['inspected']:.3f} Gbit/s, "
          f"Do Not Inspect {d['off']:.3f} Gbit/s")
    r = d["inspected"] / d["off"]
    checks.append(("download inspected/off >= 0.8", r, r >= 0.8))
if os.path.exists(idle):
    _, before, during, n = open(idle).read().split("\t")
    mb = int(during) / 1024
    print(f"waygate RSS: {int(before) / 1024:.1f} MiB before, {mb:.1f} MiB with {n.strip()} idle "
          f"inspected connections ({(int(during) - int(before)) / int(n):.1f} KiB each)")
    checks.append(("RSS with 1,000 idle < 100 MB", mb * 1.048576, mb * 1.048576 < 100))
for what, value, ok in checks:
    print(f"target {what}: {value:.2f} {'met' if ok else 'NOT met'}")
PY
