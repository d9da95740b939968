#!/usr/bin/env bash
# Measures each candidate broker: RSS before/after N idle connections, connect rate, and QoS 0
# throughput (1 publisher -> 1 subscriber). Usage: kole-sim/broker-eval/run.sh BIN N
set -u
BIN=$1; N=${2:-5000}
rss() { awk '/VmRSS/ {print $2}' /proc/$1/status; }
for cand in rumqttd mqtt5 mosquitto; do
  port=$(( 30000 + RANDOM % 20000 ))
  if [ $cand = mosquitto ]; then
    printf 'listener %s 127.0.0.1\nallow_anonymous true\nmax_queued_messages 1000000\nuser root\n' $port > /tmp/eval-mosq.conf
    mosquitto -c /tmp/eval-mosq.conf >/dev/null 2>&1 & pid=$!
  else
    RUST_LOG=off $BIN serve $cand $port >/dev/null 2>&1 & pid=$!
  fi
  sleep 1.5
  base=$(rss $pid)
  $BIN load $port $N > /tmp/eval-$cand.out 2>&1 & lpid=$!
  while ! grep -q READY /tmp/eval-$cand.out 2>/dev/null; do sleep 0.2; kill -0 $lpid 2>/dev/null || break; done
  sleep 1.5
  loaded=$(rss $pid)
  wait $lpid
  echo "$cand: base_rss_kb=$base rss_with_${N}_kb=$loaded per_conn_bytes=$(( (loaded-base)*1024/N )) $(tr '\n' ' ' < /tmp/eval-$cand.out)"
  kill $pid; wait $pid 2>/dev/null
done
