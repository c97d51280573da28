# shellcheck shell=bash
# tm_common.sh: helpers shared by the tm2fs legacy transfer-manager scripts (shared/ and ssh/).
#
# Sourced, never run. Same helper names as OpenNebula's classic tm_common.sh, with one deliberate
# difference: commands are argument lists ("$@"), never command strings, so no user data (a path,
# a host) is ever parsed by a shell. Nothing here uses eval.

SCRIPT_NAME=$(basename -- "$0")

# log MESSAGE: informational line on stdout
log() {
    printf '%s: %s\n' "$SCRIPT_NAME" "$1"
}

# log_error MESSAGE: error line on stdout (the message for the caller goes to error_message)
log_error() {
    printf '%s: ERROR: %s\n' "$SCRIPT_NAME" "$1"
}

# error_message MESSAGE: the message the caller shows, on stderr between the classic markers
error_message() {
    {
        printf '%s\n' "ERROR MESSAGE --8<------"
        printf '%s\n' "$1"
        printf '%s\n' "ERROR MESSAGE ------>8--"
    } >&2
}

# Cleanup on a failed exit: a script sets CLEANUP_PATH (and CLEANUP_HOST) once it starts creating
# its destination, so that a failure never leaves a partial file; TMP_DIR is always removed.
CLEANUP_HOST=""
CLEANUP_PATH=""
TMP_DIR=""

on_exit() {
    local status=$? path=$CLEANUP_PATH
    CLEANUP_PATH=""
    if [ -n "$TMP_DIR" ]; then
        rm -rf -- "$TMP_DIR"
    fi
    if [ "$status" -ne 0 ] && [ -n "$path" ]; then
        run_on "$CLEANUP_HOST" rm -f -- "$path" >/dev/null 2>&1 || true
    fi
    exit "$status"
}
trap on_exit EXIT

# fail MESSAGE [STATUS]: log, print the error message and exit (status 1 unless given)
fail() {
    log_error "$1"
    error_message "$1"
    exit "${2:-1}"
}

# exists_error PATH: the destination exists; exit 17 (EEXIST) so that the caller knows nothing
# was created and must not clean up
exists_error() {
    fail "destination $1 already exists" 17
}

# arg_host ARG: the host of a host:/path argument (empty for a plain /path)
arg_host() {
    case $1 in
        /*) printf '' ;;
        *:*) printf '%s' "${1%%:*}" ;;
        *) printf '' ;;
    esac
}

# arg_path ARG: the path of a host:/path argument (the argument itself for a plain /path)
arg_path() {
    case $1 in
        /*) printf '%s' "$1" ;;
        *:*) printf '%s' "${1#*:}" ;;
        *) printf '%s' "$1" ;;
    esac
}

# check_path PATH: refuse relative and empty paths, and the root directory
check_path() {
    case $1 in
        /*) ;;
        *) fail "path '$1' is not absolute" ;;
    esac
    case $1 in
        / | //* | /.) fail "refusing to work on '$1'" ;;
    esac
}

# check_host HOST: a plain host name (letters, digits, '.', '-', '_'), never an ssh option
check_host() {
    case $1 in
        '' | -* | *[!A-Za-z0-9._-]*) fail "invalid host name '$1'" ;;
    esac
}

# check_size SIZE: a whole number of MiB
check_size() {
    case $1 in
        '' | *[!0-9]*) fail "invalid size '$1' (a whole number of MiB)" ;;
    esac
}

# is_local HOST: true for the host this script runs on (or no host at all)
is_local() {
    case $1 in
        '' | localhost | 127.0.0.1) return 0 ;;
    esac
    [ "$1" = "$(hostname)" ]
}

# shell_quote WORD: WORD single-quoted for any POSIX shell (for the remote side of ssh)
shell_quote() {
    local q="'\\''"
    printf "'%s'" "${1//\'/$q}"
}

# remote_command CMD ARGS...: one command line with every word quoted
remote_command() {
    local line="" word
    for word in "$@"; do
        line="$line $(shell_quote "$word")"
    done
    printf '%s' "${line# }"
}

# SSH: the ssh client and its options (BatchMode: never wait for a password)
SSH=${SSH:-ssh}
SSH_OPTS=(-o BatchMode=yes)

# run_on HOST CMD ARGS...: run a command on HOST: locally when HOST is this host, else through
# `ssh HOST -- 'quoted words'` (ssh joins its arguments into one line for the remote shell, so
# every word is quoted here first)
run_on() {
    local host=$1
    shift
    if is_local "$host"; then
        "$@"
    else
        check_host "$host"
        "$SSH" "${SSH_OPTS[@]}" "$host" -- "$(remote_command "$@")"
    fi
}

# exec_and_log MESSAGE CMD ARGS...: run a command; on failure log its stderr, print MESSAGE (and
# the command's stderr) as the error message and exit with the command's status.
# (OpenNebula's exec_and_log takes "COMMAND STRING" MESSAGE; this one takes an argument list.)
exec_and_log() {
    local message=$1 output code
    shift
    local what="$*"
    if [ "$1" = run_on ]; then
        what="${3:-} (on ${2:-localhost})"  # the command word, and where it ran
    fi
    if output=$("$@" 2>&1 >/dev/null); then
        log "executed $what"
    else
        code=$?
        log_error "command $what failed (status $code)"
        log_error "$output"
        if [ -n "$output" ]; then
            error_message "$message: $output"
        else
            error_message "$message"
        fi
        exit "$code"
    fi
}

# make_raw HOST PATH SIZE: a new sparse file of SIZE MiB (its directory exists)
make_raw() {
    exec_and_log "cannot create $2" run_on "$1" truncate -s "${3}M" -- "$2"
}

# make_filesystem HOST PATH FSTYPE SIZE: format a new image file (PATH exists, SIZE MiB)
make_filesystem() {
    case $3 in
        raw) ;;
        swap) exec_and_log "mkswap on $2 failed" run_on "$1" mkswap -- "$2" ;;
        ext2 | ext3 | ext4)
            exec_and_log "mkfs.$3 on $2 failed" run_on "$1" "mkfs.$3" -q -F -- "$2" ;;
        xfs) exec_and_log "mkfs.xfs on $2 failed" run_on "$1" mkfs.xfs -q -f -- "$2" ;;
        vfat) exec_and_log "mkfs.vfat on $2 failed" run_on "$1" mkfs.vfat -- "$2" ;;
        qcow2)
            exec_and_log "cannot remove $2" run_on "$1" rm -f -- "$2"
            exec_and_log "qemu-img create on $2 failed" \
                run_on "$1" qemu-img create -q -f qcow2 -- "$2" "${4}M" ;;
        *) fail "unsupported FSTYPE '$3' (raw, swap, ext2, ext3, ext4, xfs, vfat, qcow2)" ;;
    esac
}

# check_fstype FSTYPE: one of the types make_filesystem knows
check_fstype() {
    case $1 in
        raw | swap | ext2 | ext3 | ext4 | xfs | vfat | qcow2) ;;
        *) fail "unsupported FSTYPE '$1' (raw, swap, ext2, ext3, ext4, xfs, vfat, qcow2)" ;;
    esac
}

# make_iso ISO FILES...: an ISO 9660 image (Joliet + Rock Ridge, label CONTEXT) holding FILES
make_iso() {
    local iso=$1 tool dir f
    shift
    if command -v genisoimage >/dev/null 2>&1; then
        tool=genisoimage
    elif command -v mkisofs >/dev/null 2>&1; then
        tool=mkisofs
    else
        fail "neither genisoimage nor mkisofs is installed (Debian: apt-get install genisoimage)"
    fi
    if [ -z "$TMP_DIR" ]; then
        TMP_DIR=$(mktemp -d)
    fi
    dir=$(mktemp -d -p "$TMP_DIR")
    mkdir -- "$dir/iso"
    for f in "$@"; do
        f=$(arg_path "$f")
        [ -e "$f" ] || fail "context file $f does not exist"
        exec_and_log "cannot copy context file $f" cp -R -- "$f" "$dir/iso/"
    done
    exec_and_log "$tool failed" "$tool" -o "$iso" -V CONTEXT -J -R -quiet "$dir/iso"
}

# path_exists HOST PATH: true if PATH exists on HOST (a dangling symlink counts)
path_exists() {
    run_on "$1" test -e "$2" || run_on "$1" test -L "$2"
}

# same_host A B: true when both hosts name the same machine
same_host() {
    if is_local "$1"; then
        is_local "$2"
    else
        [ "$1" = "$2" ]
    fi
}

# stream_copy SRC_HOST SRC_PATH DST_HOST DST_PATH: copy a file between two hosts, keeping holes
stream_copy() {
    set -o pipefail
    run_on "$1" cat -- "$2" | run_on "$3" dd "of=$4" bs=1M conv=sparse status=none
}

# make_parent HOST PATH: create the directory that will hold PATH
make_parent() {
    exec_and_log "cannot create the directory of $2" run_on "$1" mkdir -p -- "$(dirname -- "$2")"
}

# copy_file SRC_HOST SRC_PATH DST_HOST DST_PATH: a full copy (reflink where the filesystem can,
# holes kept), inside one host or streamed between two
copy_file() {
    if same_host "$1" "$3"; then
        exec_and_log "cannot copy $2 to $4" run_on "$1" cp --reflink=auto --sparse=auto -- "$2" "$4"
    else
        exec_and_log "cannot copy $1:$2 to $3:$4" stream_copy "$1" "$2" "$3" "$4"
    fi
}
