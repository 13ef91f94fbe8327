#!/usr/bin/env bash
# Packet loss and jitter between a caller and the server (issue #11), on a veth pair into a
# network namespace with tc netem. Needs root (CAP_NET_ADMIN), curl and bc. Where the kernel has
# no sch_netem (some VM kernels ship without it and cannot load modules), the caller's packets
# are shaped where they arrive in the root namespace (prerouting, before conntrack) instead:
# - loss: nftables' random drop (Debian's nftables);
# - jitter: an NFQUEUE rule sends the caller's UDP packets to benches/netem/jitter.py, which holds
#   each for a normally distributed delay (the same mean and deviation as the netem condition,
#   cut at 0) before accepting it, so some leave out of order. The rule goes in with iptables-nft
#   (an nftables table holding the xtables NFQUEUE target: some kernels lack nftables' own queue
#   statement), and jitter.py needs the NetfilterQueue package. The script installs what is
#   missing: `apt-get install -y iptables libnetfilter-queue-dev`, then a venv with
#   `pip install NetfilterQueue` under the build folder; where that fails, jitter is skipped.
#
#   benches/netem/run.sh [OUT_DIR]
#
# 1. The caller (talkline bench over WebRTC, Opus with loss concealment) lives in namespace
#    tl-caller at 10.77.0.2; the server in the root namespace at 10.77.0.1. netem shapes the
#    caller's egress, i.e. the audio the server hears: clean, 5% loss, 10% loss, jitter
#    (40 ms +/- 20 ms), and 5% loss with jitter. The report (wer.md) gives the transcription WER
#    of each against the scenario's script, and against clean.
# 2. At 100% loss mid-call, nothing may hang: a SIP call's media timeout must fire (the server
#    hangs up and its session ends) and the caller must give up.
set -euo pipefail
cd "$(dirname "$0")/../.."
# Built here, as benches/run.sh does, so the binary is never older than the sources (the dev
# profile optimises dependencies; PROFILE=release measures a release build).
profile=${PROFILE:-dev}
cargo build --quiet --profile "$profile" --bin talkline
dir=$([ "$profile" = dev ] && echo debug || echo "$profile")
bin="$(realpath "${CARGO_TARGET_DIR:-target}/$dir/talkline")"
out="${1:-target/bench/netem-$(date -u +%Y%m%d-%H%M%S)}"
mkdir -p "$out"
out="$(realpath "$out")"
scenario="${SCENARIO:-benches/scenarios/clinic.toml}"

ns=tl-caller host_if=tl-veth0 ns_if=tl-veth1
server_ip=10.77.0.1 caller_ip=10.77.0.2 http_port=18480 sip_port=15060
server_pid=""
# The userspace jitter: its NFQUEUE number, the helper's pid and python, its log.
queue=7377 jitter_pid="" jitter_python="" jitter_log=/dev/null
stop_jitter() {
  if [ -n "$jitter_pid" ]; then
    kill "$jitter_pid" 2>/dev/null || true
    wait "$jitter_pid" 2>/dev/null || true
    jitter_pid=""
  fi
  if command -v iptables-nft >/dev/null; then
    while iptables-nft -t raw -D PREROUTING -i "$host_if" -p udp -j NFQUEUE --queue-num "$queue" \
      2>/dev/null; do :; done
  fi
}
cleanup() {
  [ -n "$server_pid" ] && kill "$server_pid" 2>/dev/null || true
  stop_jitter
  # iptables-nft leaves its (empty) raw table behind; dropped only when it holds no rule.
  if [ -n "$jitter_python" ] && ! iptables-nft -t raw -S 2>/dev/null | grep -q '^-[AN]'; then
    nft delete table ip raw 2>/dev/null || true
  fi
  nft delete table inet tlshape 2>/dev/null || true
  ip netns del "$ns" 2>/dev/null || true
  ip link del "$host_if" 2>/dev/null || true
}
trap cleanup EXIT
cleanup
ip netns add "$ns"
ip link add "$host_if" type veth peer name "$ns_if"
ip link set "$ns_if" netns "$ns"
ip addr add "$server_ip/24" dev "$host_if"
ip link set "$host_if" up
ip netns exec "$ns" ip addr add "$caller_ip/24" dev "$ns_if"
ip netns exec "$ns" ip link set "$ns_if" up
ip netns exec "$ns" ip link set lo up

"$bin" serve --listen "$server_ip:$http_port" --sip-listen "$server_ip:$sip_port" \
  --sip-media-timeout 5 --max-sessions 4 >"$out/server.out" 2>"$out/server.log" &
server_pid=$!
for _ in $(seq 1 120); do
  curl -sf "http://$server_ip:$http_port/healthz" >/dev/null 2>&1 && break
  sleep 1
done
curl -sf "http://$server_ip:$http_port/healthz" >/dev/null || { echo "the server did not start"; cat "$out/server.log"; exit 1; }

if ip netns exec "$ns" tc qdisc add dev lo root netem delay 0ms 2>/dev/null; then
  ip netns exec "$ns" tc qdisc del dev lo root
  shaper=netem
else
  command -v nft >/dev/null || { echo "no sch_netem in this kernel and no nft: install nftables"; exit 1; }
  shaper=nftables
fi

# What jitter.py needs, installed where missing; 1 when it cannot be.
setup_jitter() {
  local venv="${CARGO_TARGET_DIR:-target}/netem-venv"
  if ! command -v iptables-nft >/dev/null ||
    ! [ -e /usr/include/libnetfilter_queue/libnetfilter_queue.h ]; then
    { apt-get install -y iptables libnetfilter-queue-dev ||
      { apt-get update && apt-get install -y iptables libnetfilter-queue-dev; }; } \
      >"$out/apt.log" 2>&1 || return 1
  fi
  if ! "$venv/bin/python" -c 'import netfilterqueue' 2>/dev/null; then
    { python3 -m venv "$venv" && "$venv/bin/pip" install NetfilterQueue; } >"$out/pip.log" 2>&1 ||
      return 1
  fi
  # -s: the venv's python is a link to the base one, which does not see the venv's packages.
  jitter_python="$(realpath -s "$venv/bin/python")"
}
if [ "$shaper" = netem ]; then
  echo "netem: shaping with netem" | tee "$out/shaper.txt"
elif setup_jitter; then
  echo "netem: shaping with nftables (loss) and NFQUEUE + jitter.py (jitter)" | tee "$out/shaper.txt"
else
  echo "netem: shaping with nftables (loss); jitter will be skipped: install it with" \
    "apt-get install -y iptables libnetfilter-queue-dev and pip install NetfilterQueue" \
    "(see $out/apt.log, $out/pip.log)" | tee "$out/shaper.txt"
fi

# shape LOSS_PERCENT [delay MEAN JITTER distribution normal]: the caller's egress, or a clean
# link for 0. Returns 1 when the condition needs jitter and there is no way to make it.
shape() {
  local loss="$1"
  shift
  ip netns exec "$ns" tc qdisc del dev "$ns_if" root 2>/dev/null || true
  nft delete table inet tlshape 2>/dev/null || true
  stop_jitter
  if [ "$shaper" = netem ]; then
    if [ "$loss" != 0 ] || [ $# -gt 0 ]; then
      ip netns exec "$ns" tc qdisc add dev "$ns_if" root netem loss "$loss%" "$@"
    fi
    return 0
  fi
  if [ $# -gt 0 ]; then
    [ -n "$jitter_python" ] || return 1
    # Only the caller's UDP (its media): the signalling's TCP keeps its timing.
    "$jitter_python" benches/netem/jitter.py "$queue" "${2%ms}" "${3%ms}" >"$jitter_log" 2>&1 &
    jitter_pid=$!
    for _ in $(seq 1 50); do
      grep -q '^ready' "$jitter_log" 2>/dev/null && break
      sleep 0.1
    done
    grep -q '^ready' "$jitter_log" || { stop_jitter; return 1; }
    iptables-nft -t raw -I PREROUTING -i "$host_if" -p udp -j NFQUEUE --queue-num "$queue" ||
      { stop_jitter; return 1; }
  fi
  [ "$loss" = 0 ] && return 0
  # Dropped where the caller's packets arrive, not where they leave: a drop in the sender's own
  # output hook fails its send() with EPERM, which no real network does.
  nft add table inet tlshape
  nft add chain inet tlshape in '{ type filter hook prerouting priority -300; }'
  if [ "$loss" -ge 100 ]; then
    nft add rule inet tlshape in iifname "$host_if" drop
  else
    nft add rule inet tlshape in iifname "$host_if" numgen random mod 100 '<' "$loss" drop
  fi
}

conditions=(
  "clean|0"
  "loss-5|5"
  "loss-10|10"
  "jitter-40ms|0|delay 40ms 20ms distribution normal"
  "loss-5-jitter|5|delay 40ms 20ms distribution normal"
)
for c in "${conditions[@]}"; do
  IFS='|' read -r name loss jitter <<<"$c"
  echo "netem: $name (loss $loss%${jitter:+, $jitter})"
  jitter_log="$out/$name.jitter.log"
  # shellcheck disable=SC2086
  if ! shape "$loss" $jitter; then
    echo "netem: $name skipped: jitter needs sch_netem or NFQUEUE with jitter.py (see shaper.txt)" |
      tee "$out/$name.skipped"
    continue
  fi
  ip netns exec "$ns" "$bin" bench --transport webrtc --server "$server_ip:$http_port" \
    --scenario "$scenario" --sessions 1 --reps "${REPS:-2}" --out "$out/$name" \
    >"$out/$name.log" 2>&1 || echo "netem: $name: the bench reported failures (see $name.log)"
  if [ -n "$jitter_pid" ]; then
    kill -0 "$jitter_pid" 2>/dev/null || echo "netem: $name: jitter.py died mid-run (see $name.jitter.log)"
    stop_jitter
    tail -1 "$jitter_log"
  fi
done
shape 0

echo "netem: 100% loss mid-call (SIP; the media timeout is 5 s)"
ip netns exec "$ns" timeout 120 "$bin" bench --transport sip --server "$server_ip:$sip_port" \
  --quick --out "$out/blackhole" >"$out/blackhole.log" 2>&1 &
caller=$!
sleep 6
shape 100
blackhole_start=$(date +%s.%N)
ended=""
for _ in $(seq 1 60); do
  active=$(curl -sf "http://$server_ip:$http_port/metrics" | awk '/^talkline_sessions_active /{print $2}')
  if [ "${active:-1}" = "0" ]; then ended=$(date +%s.%N); break; fi
  sleep 0.5
done
caller_status=0
wait "$caller" || caller_status=$?
shape 0
python3 benches/netem/wer.py "$scenario" "$out" "${ended:+$(echo "$ended - $blackhole_start" | bc)}" "$caller_status" \
  | tee "$out/wer.md"
