#!/usr/bin/env bash
# Packet loss and jitter between a caller and the server (issue #11), on a veth pair into a
# network namespace with tc netem. Needs root (CAP_NET_ADMIN), curl and bc. Where the kernel has
# no sch_netem (some VM kernels ship without it and cannot load modules), loss is made with
# nftables' random drop instead (Debian's nftables) and the jitter conditions are skipped.
#
#   benches/netem/run.sh [OUT_DIR]
#
# 1. The caller (talkline bench over WebRTC, Opus with loss concealment) lives in namespace
#    tl-caller at 10.77.0.2; the server in the root namespace at 10.77.0.1. netem shapes the
#    caller's egress, i.e. the audio the server hears: clean, 5% loss, 10% loss, jitter, and
#    5% loss with jitter. The report (wer.md) gives the transcription WER of each against the
#    scenario's script, and against clean.
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
cleanup() {
  [ -n "$server_pid" ] && kill "$server_pid" 2>/dev/null || true
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
echo "netem: shaping with $shaper" | tee "$out/shaper.txt"

# shape LOSS_PERCENT [netem delay arguments]: the caller's egress, or a clean link for 0.
# Returns 1 when the condition needs netem and the kernel has none.
shape() {
  local loss="$1"
  shift
  ip netns exec "$ns" tc qdisc del dev "$ns_if" root 2>/dev/null || true
  nft delete table inet tlshape 2>/dev/null || true
  if [ "$shaper" = netem ]; then
    if [ "$loss" != 0 ] || [ $# -gt 0 ]; then
      ip netns exec "$ns" tc qdisc add dev "$ns_if" root netem loss "$loss%" "$@"
    fi
    return 0
  fi
  [ $# -gt 0 ] && return 1
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
  # shellcheck disable=SC2086
  if ! shape "$loss" $jitter; then
    echo "netem: $name skipped: jitter needs sch_netem, which this kernel lacks" | tee "$out/$name.skipped"
    continue
  fi
  ip netns exec "$ns" "$bin" bench --transport webrtc --server "$server_ip:$http_port" \
    --scenario "$scenario" --sessions 1 --reps "${REPS:-2}" --out "$out/$name" \
    >"$out/$name.log" 2>&1 || echo "netem: $name: the bench reported failures (see $name.log)"
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
