#!/bin/sh
# The container image's entrypoint: makes sure a config exists, then runs `waygate ARGS`.
#
# The config is $WAYGATE_CONFIG (the image sets /etc/waygate/waygate.toml, which `docker exec
# ... waygate device enroll` reads too). Mount your own file there, or let this script write one
# the first time from the environment:
#   WAYGATE_CONFIG_TOML      the whole config, verbatim
#   WAYGATE_PUBLIC_ENDPOINT  host:port written into device configs (wireguard.public_endpoint)
# A written config keeps the state in /var/lib/waygate (the image's volume).
set -eu

config="${WAYGATE_CONFIG:-/etc/waygate/waygate.toml}"
if [ ! -e "$config" ]; then
    umask 077
    if [ -n "${WAYGATE_CONFIG_TOML:-}" ]; then
        printf '%s\n' "$WAYGATE_CONFIG_TOML" >"$config"
    else
        {
            echo 'data_dir = "/var/lib/waygate"'
            if [ -n "${WAYGATE_PUBLIC_ENDPOINT:-}" ]; then
                echo '[wireguard]'
                printf 'public_endpoint = "%s"\n' "$WAYGATE_PUBLIC_ENDPOINT"
            fi
        } >"$config"
    fi
fi
export WAYGATE_CONFIG="$config"

case "${1:-}" in
    # `docker run IMAGE sh` and the like run the command itself.
    /* | sh | bash) exec "$@" ;;
esac
exec waygate "$@"
