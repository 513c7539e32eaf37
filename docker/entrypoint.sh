#!/usr/bin/env bash
# The image's entrypoint: `wattserve serve` with a flag for each WATTSERVE_* variable that is
# set, then the container's arguments, which come last and so win over the variables (for an
# option given twice, the last one counts).
#
# A variable that is unset or empty passes nothing: the flag's default, or the --config file's
# value, holds, and a flag is only ever passed because someone asked for it. WATTSERVE_API_KEY
# is not passed either: wattserve reads it itself, which keeps the key out of the process list.
# The health check polls WATTSERVE_PORT, so change the port with it, not with --port.
set -euo pipefail

args=()
pass() {  # pass VARIABLE --flag
    if [[ -n "${!1:-}" ]]; then
        args+=("$2" "${!1}")
    fi
}
pass WATTSERVE_CONFIG --config
pass WATTSERVE_HOST --host
pass WATTSERVE_PORT --port
pass WATTSERVE_KV_CACHE_DTYPE --kv-cache-dtype
pass WATTSERVE_SLO_TTFT_MS --slo-ttft-ms
pass WATTSERVE_SLO_TPOT_MS --slo-tpot-ms
pass WATTSERVE_POWER_CAP_WATTS --power-cap-watts
# The model is the positional argument: set WATTSERVE_MODEL or give it as an argument, not both.
if [[ -n "${WATTSERVE_MODEL:-}" ]]; then
    args+=("$WATTSERVE_MODEL")
fi

# exec: wattserve becomes the container's main process and gets `docker stop`'s SIGTERM, on
# which it finishes the requests in flight before it exits.
exec wattserve serve "${args[@]}" "$@"
