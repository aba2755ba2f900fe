# Shared by scripts/vmfactory and scripts/test: installs what vmfactory needs on Debian.
set -euo pipefail

# Installs the Debian packages given as arguments when any is missing.
ensure_packages() {
    local missing=()
    for package in "$@"; do
        dpkg-query -W -f='${Status}' "$package" 2>/dev/null | grep -q "install ok installed" \
            || missing+=("$package")
    done
    [ ${#missing[@]} -eq 0 ] && return 0
    echo "vmfactory: installing ${missing[*]} with apt-get" >&2
    local sudo=()
    [ "$(id -u)" -eq 0 ] || sudo=(sudo)
    "${sudo[@]}" apt-get update -q >&2
    DEBIAN_FRONTEND=noninteractive "${sudo[@]}" apt-get install -y -q --no-install-recommends "${missing[@]}" >&2
}

ensure_toolchain() {
    if ! command -v cargo >/dev/null 2>&1; then
        echo "vmfactory: cargo not found. Install Rust (https://rustup.rs), then run this again." >&2
        exit 1
    fi
    # Guest images are built from Debian packages; apt needs a package list to resolve them.
    if ! apt-cache policy linux-image-cloud-amd64 2>/dev/null | grep -q 'Candidate: [0-9]'; then
        local sudo=()
        [ "$(id -u)" -eq 0 ] || sudo=(sudo)
        "${sudo[@]}" apt-get update -q >&2
    fi
}

ensure_packages qemu-system-x86 ca-certificates
ensure_toolchain
