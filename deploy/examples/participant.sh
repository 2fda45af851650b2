#!/bin/sh
# A Phantom participant callback for the exec adapter: the agent runs it once per
# transition (participant = exec, participant_exec = "sh deploy/examples/participant.sh").
# It stands in for a database: it keeps each shard's role and epoch in a directory,
# "copies" by sleeping, and appends one line per transition to a log:
#
#   START END NODE TRANSITION SHARD EPOCH FROM->TO SOURCES LEASE_UNTIL
#
# It also answers the question a database asks on every client request:
#
#   sh participant.sh may-write NODE SHARD EPOCH   exit 0: take the write; 1: refuse it
#
# (refused when this node is not the shard's primary, its lease has ended, or the
# request's epoch is older than the one the node was made primary at).
#
# Environment: PHANTOM_TRANSITION, PHANTOM_SHARD, PHANTOM_EPOCH, PHANTOM_FROM,
# PHANTOM_TO, PHANTOM_SOURCES, PHANTOM_NODE, PHANTOM_LEASE_UNTIL, PHANTOM_LEASE_FILE
# (see docs/integrating.md); PARTICIPANT_DIR (state, default var/participant),
# PARTICIPANT_LOG (default $PARTICIPANT_DIR/transitions.log), COPY_SECONDS (default 0.2).
set -eu

dir="${PARTICIPANT_DIR:-var/participant}"
log="${PARTICIPANT_LOG:-$dir/transitions.log}"
now() { date +%s.%N; }

if [ "${1:-}" = "may-write" ]; then
    node="$2"; shard="$3"; epoch="$4"
    f="$dir/$node/$(printf '%s' "$shard" | tr '/' '_')"
    [ -f "$f" ] || exit 1
    read -r role since < "$f"
    [ "$role" = primary ] || exit 1
    [ "$epoch" -ge "$since" ] || exit 1            # a client on an older map: refuse
    lease="${PHANTOM_LEASE_FILE:-${PHANTOM_DATA:-var}/$node.lease}"   # the agent rewrites it every renewal
    until=$(sed -n 's/.*"until": *\([0-9.]*\).*/\1/p' "$lease" 2>/dev/null || true)
    [ -n "$until" ] || exit 1
    awk -v u="$until" -v n="$(now)" 'BEGIN { exit !(n < u) }'   # lease still running
    exit $?
fi

start=$(now)
mkdir -p "$dir/$PHANTOM_NODE"
f="$dir/$PHANTOM_NODE/$(printf '%s' "$PHANTOM_SHARD" | tr '/' '_')"
case "$PHANTOM_TRANSITION" in
    join)    sleep "${COPY_SECONDS:-0.2}"            # copy from $PHANTOM_SOURCES here
             echo "joining $PHANTOM_EPOCH" > "$f" ;;
    replica) echo "replica $PHANTOM_EPOCH" > "$f" ;;  # open for reads (catch up first)
    primary) echo "primary $PHANTOM_EPOCH" > "$f" ;;  # take writes at this epoch and newer
    demote)  echo "replica $PHANTOM_EPOCH" > "$f" ;;  # stop writes, keep serving reads
    fence)   echo "fenced $PHANTOM_EPOCH" > "$f" ;;   # lease lost: stop writes now
    drop)    rm -f "$f" ;;                            # free the shard's space
    *)       echo "unknown transition $PHANTOM_TRANSITION" >&2; exit 2 ;;
esac
printf '%s %s %s %s %s %s %s->%s %s %s\n' "$start" "$(now)" "$PHANTOM_NODE" "$PHANTOM_TRANSITION" \
    "$PHANTOM_SHARD" "$PHANTOM_EPOCH" "$PHANTOM_FROM" "$PHANTOM_TO" "${PHANTOM_SOURCES:--}" \
    "${PHANTOM_LEASE_UNTIL:--}" >> "$log"
