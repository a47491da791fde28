#!/usr/bin/env bash
# Install the Debian packages that atlasflow's tests need, when they are missing.
#
#   scripts/install-system-deps.sh [slurm] [browser]    (no argument: both groups)
#
# slurm:   a single-node SLURM cluster for tests/test_slurm.py (munge, slurmctld, slurmd, client)
# browser: headless Chromium + its WebDriver and a font, for the browser test of the HTML reports
#
# Idempotent: installs only what dpkg says is absent, and runs `apt-get update` once, only when
# something must be installed. Never fails the build: on a machine where it cannot install (not
# root, no apt-get, no network) it says why and exits 0; the tests that need the packages then
# skip with their own message.
set -u

groups=("$@")
[ ${#groups[@]} -eq 0 ] && groups=(slurm browser)

wanted=()
for group in "${groups[@]}"; do
    case "$group" in
        slurm) wanted+=(munge slurmctld slurmd slurm-client) ;;
        browser) wanted+=(chromium chromium-driver fonts-dejavu-core) ;;
        *) echo "install-system-deps: unknown group '$group' (use slurm, browser)" >&2; exit 2 ;;
    esac
done

missing=()
for pkg in "${wanted[@]}"; do
    status=$(dpkg-query -W -f='${Status}' "$pkg" 2>/dev/null || true)
    [ "$status" = "install ok installed" ] || missing+=("$pkg")
done

if [ ${#missing[@]} -eq 0 ]; then
    echo "install-system-deps: all present (${wanted[*]})"
    exit 0
fi
if ! command -v apt-get >/dev/null 2>&1; then
    echo "install-system-deps: no apt-get here; not installing ${missing[*]} (tests needing them will skip)"
    exit 0
fi
if [ "$(id -u)" -ne 0 ]; then
    echo "install-system-deps: not root; not installing ${missing[*]} (tests needing them will skip)"
    exit 0
fi

export DEBIAN_FRONTEND=noninteractive
# Another apt run (a parallel job, unattended upgrades) may hold the lock: wait for it, bounded.
apt_opts=(-o DPkg::Lock::Timeout=300 -q)
echo "install-system-deps: installing ${missing[*]}"
if ! apt-get "${apt_opts[@]}" update >/tmp/atlasflow-apt-update.log 2>&1; then
    echo "install-system-deps: apt-get update failed (see /tmp/atlasflow-apt-update.log); continuing without ${missing[*]}"
    exit 0
fi
if ! apt-get "${apt_opts[@]}" install -y --no-install-recommends "${missing[@]}"; then
    echo "install-system-deps: apt-get install failed; continuing without ${missing[*]} (tests needing them will skip)"
    exit 0
fi
echo "install-system-deps: installed ${missing[*]}"
