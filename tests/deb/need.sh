# Sourced by libs.sh and tools.sh: need WHAT PACKAGE... makes sure Debian packages are
# installed, with apt when root and they are missing; exits 3, saying why as WHAT, where that
# is not possible (not Debian 12, or not root with something missing).
need() {
    what=$1
    shift
    if [ "$(cut -d. -f1 /etc/debian_version 2>/dev/null)" != 12 ]; then
        echo "$what: skipped, not a Debian 12 machine" >&2
        exit 3
    fi
    missing=""
    for p in "$@"; do
        dpkg-query -W -f='${Status}\n' "$p" 2>/dev/null | grep -q '^install ok installed$' || missing="$missing $p"
    done
    [ -z "$missing" ] && return 0
    if [ "$(id -u)" != 0 ]; then
        echo "$what: skipped, needs root to install:$missing" >&2
        exit 3
    fi
    apt-get update -qq
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends $missing >/dev/null
}
