#!/usr/bin/env bash
# Builds libklp.so and klpctl in release mode and installs them, make-install style:
#
#   user/preload/install.sh [--prefix DIR] [--target TRIPLE]
#
# installs, under $DESTDIR$PREFIX (PREFIX default /usr/local):
#   lib/libklp.so  include/klp.h  lib/pkgconfig/klp.pc  bin/klpctl
# --target cross-builds both for TRIPLE (e.g. aarch64-unknown-linux-gnu; .cargo/config.toml
# names the linkers). Running it again installs the same files again (nothing else is
# touched). Honours CARGO_TARGET_DIR and DESTDIR (the staging root, not recorded in
# klp.pc).
set -euo pipefail
cd "$(dirname "$0")/../.."

usage() {
    echo "usage: user/preload/install.sh [--prefix DIR] [--target TRIPLE]" >&2
    exit 2
}
prefix=/usr/local
target=
while [ $# -gt 0 ]; do
    case "$1" in
        --prefix) [ $# -ge 2 ] || usage; prefix=$2; shift 2 ;;
        --prefix=*) prefix=${1#--prefix=}; shift ;;
        --target) [ $# -ge 2 ] || usage; target=$2; shift 2 ;;
        --target=*) target=${1#--target=}; shift ;;
        -h | --help) usage ;;
        *) echo "install.sh: unknown argument '$1'" >&2; usage ;;
    esac
done
case "$prefix" in
    /*) ;;
    *) echo "install.sh: the prefix must be an absolute path (got '$prefix')" >&2; exit 2 ;;
esac

tflag=()
out=${CARGO_TARGET_DIR:-target}
if [ -n "$target" ]; then
    tflag=(--target "$target")
    out=$out/$target
    arch=${target%%-*}
else
    arch=$(uname -m)
fi
out=$out/release
case "$arch" in
    x86_64) patchflags="-fpatchable-function-entry=5 -fno-omit-frame-pointer" ;;
    aarch64) patchflags="-fpatchable-function-entry=2 -fno-omit-frame-pointer" ;;
    powerpc64le | ppc64le) patchflags="-pg -mprofile-kernel -fno-omit-frame-pointer" ;;
    s390x) patchflags="-pg -mfentry -mnop-mcount -mbackchain -fno-omit-frame-pointer" ;;
    *) echo "install.sh: klp has no back-end for $arch (x86_64, aarch64, ppc64le, s390x)" >&2; exit 1 ;;
esac

echo "install.sh: building libklp.so and klpctl (release${target:+, $target})"
cargo build --release -p klp-preload "${tflag[@]}"
cargo build --release -p klp-user --bin klpctl "${tflag[@]}"
version=$(cargo pkgid -p klp-preload | sed 's/.*[#@]//')

dest=${DESTDIR:-}$prefix
install -d "$dest/lib/pkgconfig" "$dest/include" "$dest/bin"
install -m 0755 "$out/libklp.so" "$dest/lib/libklp.so"
install -m 0644 user/preload/include/klp.h "$dest/include/klp.h"
install -m 0755 "$out/klpctl" "$dest/bin/klpctl"
sed -e "s|@PREFIX@|$prefix|" -e "s|@VERSION@|$version|" -e "s|@ARCH@|$arch|" \
    -e "s|@PATCHFLAGS@|$patchflags|" user/preload/klp.pc.in >"$dest/lib/pkgconfig/klp.pc.tmp"
mv "$dest/lib/pkgconfig/klp.pc.tmp" "$dest/lib/pkgconfig/klp.pc"
chmod 0644 "$dest/lib/pkgconfig/klp.pc"
for f in lib/libklp.so include/klp.h lib/pkgconfig/klp.pc bin/klpctl; do
    echo "installed $dest/$f"
done
