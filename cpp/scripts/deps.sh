#!/bin/sh
# Build dependencies of cpp/ (called by `make cpp`; safe to rerun, does nothing once everything is there).
#
# 1. Debian packages: cmake, g++, libjpeg-turbo, zlib, nlohmann-json, OpenSSL's libcrypto (apt-get, as root).
# 2. ONNX Runtime's C/C++ headers, which no bookworm, PyPI or npm package ships: Debian trixie's
#    libonnxruntime-dev .deb is fetched with `apt-get download` through a private sources list and
#    state folder under cpp/.deps/apt (the system's apt configuration is not touched), and its four
#    headers are unpacked into cpp/.deps/onnxruntime/include. Nothing of it is committed.
#
# Exit status: 0 ready; 3 the dependencies cannot be installed here (not root, no apt-get, no
# mirror): the reason is printed and written to cpp/.deps/UNAVAILABLE, and the C++ tests skip with it.
# QKS_EXTRA_PKGS adds Debian packages (cpp/scripts/fuzz.sh: clang-16 libfuzzer-16-dev) and
# QKS_UNAVAILABLE_NOTE names another file for the reason (FUZZ_UNAVAILABLE).
set -u
here=$(cd "$(dirname "$0")/.." && pwd)
deps="$here/.deps"
mkdir -p "$deps"
note="$deps/${QKS_UNAVAILABLE_NOTE:-UNAVAILABLE}"
rm -f "$note"

unavailable() {
    echo "note: cpp/ not built: $1" >&2
    echo "$1" > "$note"
    exit 3
}

PKGS="cmake g++ make libjpeg62-turbo-dev zlib1g-dev nlohmann-json3-dev libssl-dev ${QKS_EXTRA_PKGS:-}"
missing=""
for p in $PKGS; do
    dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" || missing="$missing $p"
done
if [ -n "$missing" ]; then
    command -v apt-get >/dev/null 2>&1 || unavailable "no apt-get to install the build dependencies:$missing"
    [ "$(id -u)" = 0 ] || unavailable "installing the build dependencies (${missing# }) needs root (apt-get)"
    echo "cpp: apt-get install$missing" >&2
    if ! DEBIAN_FRONTEND=noninteractive apt-get install -y -qq $missing >/dev/null 2>&1; then
        apt-get update -qq >/dev/null 2>&1
        DEBIAN_FRONTEND=noninteractive apt-get install -y -qq $missing >/dev/null 2>&1 ||
            unavailable "apt-get could not install:$missing"
    fi
fi

inc="$deps/onnxruntime/include"
HEADERS="onnxruntime_c_api.h onnxruntime_cxx_api.h onnxruntime_cxx_inline.h onnxruntime_float16.h"
have=1
for h in $HEADERS; do [ -f "$inc/$h" ] || have=0; done
if [ "$have" = 0 ]; then
    command -v apt-get >/dev/null 2>&1 || unavailable "no apt-get to fetch ONNX Runtime's headers (Debian trixie libonnxruntime-dev)"
    apt="$deps/apt"
    rm -rf "$apt" && mkdir -p "$apt/etc" "$apt/state/lists/partial" "$apt/cache/archives/partial" "$apt/deb"
    echo "deb [signed-by=/usr/share/keyrings/debian-archive-keyring.gpg] http://deb.debian.org/debian trixie main" \
        > "$apt/etc/sources.list"
    set -- -o Dir::Etc::sourcelist="$apt/etc/sources.list" -o Dir::Etc::sourceparts=- \
           -o Dir::State="$apt/state" -o Dir::Cache="$apt/cache" -o Dir::State::status=/var/lib/dpkg/status \
           -o APT::Get::List-Cleanup=0 -o Debug::NoLocking=1
    echo "cpp: fetching ONNX Runtime's C/C++ headers (Debian trixie libonnxruntime-dev, private apt lists)" >&2
    apt-get "$@" -qq update >/dev/null 2>&1 || unavailable "apt-get update of a private Debian trixie list failed (no mirror?)"
    (cd "$apt/deb" && apt-get "$@" -qq download libonnxruntime-dev >/dev/null 2>&1) ||
        unavailable "apt-get download libonnxruntime-dev (Debian trixie) failed"
    rm -rf "$apt/x" && mkdir -p "$apt/x" && dpkg-deb -x "$apt/deb"/libonnxruntime-dev_*.deb "$apt/x" ||
        unavailable "could not unpack libonnxruntime-dev"
    mkdir -p "$inc"
    for h in $HEADERS; do
        cp "$apt/x/usr/include/onnxruntime/$h" "$inc/$h" || unavailable "libonnxruntime-dev has no $h"
    done
    ls "$apt/deb" | sed -n 's/^libonnxruntime-dev_\(.*\)_.*\.deb$/\1/p' > "$deps/onnxruntime/VERSION"
    rm -rf "$apt"
fi
exit 0
