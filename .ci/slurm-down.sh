#!/usr/bin/env bash
# Stop the single-node SLURM cluster that .ci/slurm-up.sh STATE_DIR started, whatever state it is in.
#
#   .ci/slurm-down.sh STATE_DIR
#
# Cancels the jobs, sends TERM to slurmd, slurmctld and munged (found by their pid files, or, when
# a daemon died before writing one, by a command line or environment that names STATE_DIR),
# waits, KILLs what is left (daemons and any slurmstepd of this cluster), and removes the
# /etc/slurm/slurm.conf symlink if it points into STATE_DIR. Safe to run twice or after a failed
# start. Exits 0 when nothing of the cluster is left running, 1 otherwise.
set -uo pipefail
# The daemons live in /usr/sbin, which a non-login PATH (CI, cron) may lack.
export PATH="$PATH:/usr/sbin:/sbin"

state_arg=${1:?usage: slurm-down.sh STATE_DIR}
[ -d "$state_arg" ] || { echo "slurm-down: $state_arg does not exist; nothing to stop"; exit 0; }
state=$(cd "$state_arg" && pwd)
conf="$state/slurm.conf"
system_conf=/etc/slurm/slurm.conf
wait_seconds=${SLURM_DOWN_TIMEOUT:-30}

# Processes of this cluster: "pid name" lines. A pid counts only if its command name matches and
# it names our state folder (pid file, command line or SLURM_CONF in its environment), so an
# unrelated process that reused a pid, or another cluster, is never signalled.
cluster_pids() {
    local proc pid comm
    for proc in /proc/[0-9]*; do
        pid=${proc#/proc/}
        comm=$(cat "$proc/comm" 2>/dev/null) || continue
        case "$comm" in munged | slurmctld | slurmscriptd | slurmd | slurmstepd) ;; *) continue ;; esac
        # A zombie has already exited (it waits for init to reap it): nothing to stop.
        [ "$(awk '{print $3}' "$proc/stat" 2>/dev/null)" = "Z" ] && continue
        {
            if [ -f "$state/run/$comm.pid" ] && [ "$(cat "$state/run/$comm.pid")" = "$pid" ]; then
                echo "$pid $comm"
            elif tr '\0' '\n' <"$proc/cmdline" | grep -qF "$state/"; then
                echo "$pid $comm"
            elif tr '\0' '\n' <"$proc/environ" | grep -qxF "SLURM_CONF=$conf"; then
                echo "$pid $comm"
            fi
        } 2>/dev/null
    done
}

daemon_alive() {
    local pidfile="$state/run/$1.pid" pid
    [ -f "$pidfile" ] || return 1
    pid=$(cat "$pidfile" 2>/dev/null) || return 1
    [ -n "$pid" ] && [ "$(cat "/proc/$pid/comm" 2>/dev/null)" = "$1" ]
}

# 1. Cancel the jobs while the controller can still do it (slurmd then kills their processes).
if [ -f "$conf" ] && daemon_alive slurmctld; then
    export SLURM_CONF="$conf"
    job_ids=$(timeout 10 squeue -h -o %A 2>/dev/null | tr '\n' ' ')
    if [ -n "${job_ids// /}" ]; then
        echo "slurm-down: cancelling jobs $job_ids"
        # shellcheck disable=SC2086
        timeout 10 scancel $job_ids 2>/dev/null || true
        deadline=$((SECONDS + 15))
        while [ $SECONDS -lt $deadline ] && [ -n "$(timeout 10 squeue -h -o %A 2>/dev/null)" ]; do
            sleep 0.5
        done
    fi
fi

# 2. TERM the daemons, slurmd first so it can still clean up its steps, munged last.
for name in slurmd slurmctld munged; do
    cluster_pids | while read -r pid comm; do
        [ "$comm" = "$name" ] && kill -TERM "$pid" 2>/dev/null
    done
done

# 3. Wait for them, then KILL anything of this cluster that is left (a slurmstepd outlives slurmd).
deadline=$((SECONDS + wait_seconds))
while [ $SECONDS -lt $deadline ]; do
    left=$(cluster_pids | awk '$2 != "slurmstepd" && $2 != "slurmscriptd"')
    [ -z "$left" ] && break
    sleep 0.5
done
left=$(cluster_pids)
if [ -n "$left" ]; then
    echo "slurm-down: killing leftovers: $(echo "$left" | tr '\n' ' ')"
    echo "$left" | while read -r pid _; do kill -KILL "$pid" 2>/dev/null; done
    deadline=$((SECONDS + 10))
    while [ $SECONDS -lt $deadline ] && [ -n "$(cluster_pids)" ]; do sleep 0.5; done
fi

# 4. Give /etc/slurm/slurm.conf back.
if [ -L "$system_conf" ] && [ "$(readlink "$system_conf")" = "$conf" ]; then
    rm -f "$system_conf"
fi

left=$(cluster_pids)
if [ -n "$left" ]; then
    echo "slurm-down: still running after KILL: $(echo "$left" | tr '\n' ' ')" >&2
    exit 1
fi
echo "slurm-down: cluster in $state stopped"
