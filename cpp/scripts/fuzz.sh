#!/bin/sh
# The libFuzzer targets of libqks (cpp/fuzz, FUZZING.md). Called by `make fuzz` and `make fuzz-build`.
#
#   cpp/scripts/fuzz.sh build                 # clang-16 + libfuzzer-16-dev (apt-get), then cpp/build-fuzz
#   cpp/scripts/fuzz.sh run [SECONDS] [TARGET...]
#       each target for SECONDS (default 180) in turn; corpora grow in .cache/fuzz/corpus/<target>
#       (seeded from .cache/fuzz/seeds, made by cpp/fuzz/seeds.py), crashes go to
#       .cache/fuzz/findings/<target>/, logs to .cache/fuzz/logs/, and one line per run to
#       .cache/fuzz/runs.tsv: target, wall s, CPU s, executions, edges (cov), features (ft), corpus,
#       findings. `fuzz.sh table` sums runs.tsv per target as a Markdown table (FUZZING.md's campaign).
#       FUZZ_BIN=DIR runs the binaries in DIR. FUZZ_FORK=1 keeps going after a finding (libFuzzer's -fork=1 -ignore_crashes=1).
#
# Exit status: 0 done (run: no finding); 1 a target found something; 3 clang/libFuzzer cannot be
# installed here (the reason is printed and written to cpp/.deps/FUZZ_UNAVAILABLE; the fuzz tests skip).
set -u
here=$(cd "$(dirname "$0")/../.." && pwd)
build="$here/cpp/build-fuzz"
cache="$here/.cache/fuzz"
export UBSAN_OPTIONS="${UBSAN_OPTIONS:-print_stacktrace=1}"
TARGETS="fuzz_jpeg fuzz_png fuzz_gif fuzz_image_any fuzz_exif fuzz_npy fuzz_bundle fuzz_labels fuzz_records"

# the C++ build dependencies plus clang and libFuzzer; the reason goes to cpp/.deps/FUZZ_UNAVAILABLE
deps() {
    QKS_EXTRA_PKGS="clang-16 libfuzzer-16-dev" QKS_UNAVAILABLE_NOTE=FUZZ_UNAVAILABLE sh "$here/cpp/scripts/deps.sh"
    rc=$?
    [ $rc -eq 0 ] || exit $rc
}

do_build() {
    deps
    CC=clang-16 CXX=clang++-16 cmake -S "$here/cpp" -B "$build" -DCMAKE_BUILD_TYPE=RelWithDebInfo \
        "-DCMAKE_CXX_FLAGS_RELWITHDEBINFO=-O1 -g" "-DCMAKE_C_FLAGS_RELWITHDEBINFO=-O1 -g" \
        -DQKS_FUZZ=ON -DQKS_WERROR=ON >/dev/null || exit 1
    cmake --build "$build" -j"${CPP_JOBS:-2}" -- --no-print-directory || exit 1
}

dict_of() {
    case "$1" in
        fuzz_jpeg) echo jpeg ;; fuzz_png) echo png ;; fuzz_gif) echo gif ;; fuzz_image_any) echo image ;;
        fuzz_exif) echo exif ;; fuzz_npy) echo npy ;; fuzz_bundle) echo bundle ;; fuzz_labels) echo labels ;;
        fuzz_records) echo records ;;
    esac
}

# The last status line of a libFuzzer log: "#N ... cov: E ft: F corp: C".
stats() {
    grep -E '^#[0-9]+.*cov: [0-9]+ ft: [0-9]+' "$1" | tail -1 |
        sed -E 's/^#([0-9]+):?[[:space:]]*[A-Z]*[[:space:]]*cov: ([0-9]+) ft: ([0-9]+) corp: ([0-9]+).*/\1\t\2\t\3\t\4/'
}

run() {
    seconds=${1:-180}
    [ $# -gt 0 ] && shift
    targets=${*:-$TARGETS}
    bin=${FUZZ_BIN:-$build/fuzz}  # a copy, for a long campaign while the build changes
    [ -d "$cache/seeds/fuzz_jpeg" ] || "$here/.venv/bin/python" "$here/cpp/fuzz/seeds.py" "$cache/seeds" ||
        { echo "fuzz: cannot make the seed corpora (make venv first)" >&2; exit 1; }
    status=0
    for t in $targets; do
        [ -x "$bin/$t" ] || { echo "fuzz: no $bin/$t: run cpp/scripts/fuzz.sh build" >&2; exit 1; }
        mkdir -p "$cache/corpus/$t" "$cache/findings/$t" "$cache/logs"
        log="$cache/logs/$t-$(date +%Y%m%d-%H%M%S).log"
        fork=""
        [ "${FUZZ_FORK:-0}" = 1 ] && fork="-fork=1 -ignore_crashes=1 -ignore_timeouts=1 -ignore_ooms=1"
        before=$(ls "$cache/findings/$t" | wc -l)
        # -rss_limit_mb: a decode above the harness's pixel cap is skipped, so 2 GB means a leak or a bomb
        /usr/bin/time -f "%e %U %S" -o "$log.time" "$bin/$t" $fork -max_total_time="$seconds" \
            -timeout=25 -rss_limit_mb=2048 -max_len=200000 -print_final_stats=1 \
            -dict="$here/cpp/fuzz/dict/$(dict_of "$t").dict" -artifact_prefix="$cache/findings/$t/" \
            "$cache/corpus/$t" "$cache/seeds/$t" > "$log" 2>&1
        rc=$?
        after=$(ls "$cache/findings/$t" | wc -l)
        read -r wall user sys <<EOT
$(tail -1 "$log.time")
EOT
        cpu=$(echo "$user $sys" | awk '{printf "%.0f", $1 + $2}')
        line="$t\t${wall%.*}\t$cpu\t$(stats "$log")\t$((after - before))"
        printf "$line\n" >> "$cache/runs.tsv"
        printf "fuzz: $line  (log: $log)\n" >&2
        if [ $rc -ne 0 ] || [ "$after" -ne "$before" ]; then
            status=1
            echo "fuzz: $t found something: see $log and $cache/findings/$t/" >&2
        fi
    done
    exit $status
}

# runs.tsv per target: runs, wall and CPU minutes, executions (summed), edges and features (the
# largest run's: each run starts from the grown corpus), corpus (last), findings (summed)
table() {
    echo "| target | runs | wall min | CPU min | executions | edges (cov) | features (ft) | corpus | findings |"
    echo "|---|---|---|---|---|---|---|---|---|"
    awk -F'\t' 'NF >= 8 { t = $1; order[t] = order[t] ? order[t] : ++n; runs[t]++; wall[t] += $2; cpu[t] += $3; ex[t] += $4
                  if ($5 > cov[t]) cov[t] = $5; if ($6 > ft[t]) ft[t] = $6; corp[t] = $7; fin[t] += $8 }
         END { for (t in order) printf "%d| `%s` | %d | %.0f | %.0f | %d | %d | %d | %d | %d |\n", order[t], t, runs[t],
               wall[t] / 60, cpu[t] / 60, ex[t], cov[t], ft[t], corp[t], fin[t] }' "${1:-$cache/runs.tsv}" |
        sort -n | cut -d'|' -f2- | sed 's/^/|/'
}

# The edges and features each target's grown corpus covers, measured the same way for all (libFuzzer
# loads the corpus and stops: its INITED line), unlike the status lines of fork and plain runs.
coverage() {
    bin=${FUZZ_BIN:-$build/fuzz}
    for t in ${*:-$TARGETS}; do
        [ -d "$cache/corpus/$t" ] || continue
        line=$("$bin/$t" -runs=0 -rss_limit_mb=2048 -max_len=200000 "$cache/corpus/$t" 2>&1 | grep -E 'INITED' | tail -1)
        echo "$t $(echo "$line" | sed -E 's/.*cov: ([0-9]+) ft: ([0-9]+) corp: ([0-9]+).*/edges \1 features \2 corpus \3/')"
    done
}

case "${1:-}" in
    build) do_build ;;
    coverage) shift; coverage "$@" ;;
    table) shift; table "$@" ;;
    deps) deps ;;
    run) shift; run "$@" ;;
    *) echo "usage: $0 build | run [SECONDS] [TARGET...] | table [RUNS.tsv] | coverage [TARGET...]" >&2; exit 2 ;;
esac
