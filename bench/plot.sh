#!/usr/bin/env bash
# Draws the chart of a compare.sh run with gnuplot (Debian: gnuplot-nox):
# step time of the floor, LoRA and full fine-tuning, and peak memory of LoRA and
# full fine-tuning, lora (C++) beside PyTorch.
#
#   bench/plot.sh [summary.dat] [out.png]      (defaults: bench/results/summary.dat, docs/bench.png)
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
DAT="${1:-$ROOT/bench/results/summary.dat}"
PNG="${2:-$ROOT/docs/bench.png}"
[[ -r "$DAT" ]] || { echo "plot.sh: $DAT not found; run bench/compare.sh first" >&2; exit 1; }
mkdir -p "$(dirname "$PNG")"

# summary.dat has one "side mode median_ms peak_rss_mib" line per row; gnuplot's
# clustered histograms want one row per mode and one column per side.
TABLE="$(mktemp)"
trap 'rm -f "$TABLE"' EXIT
awk '!/^#/ { ms[$2, $1] = $3; mib[$2, $1] = $4 }
     END {
       split("floor lora full", modes, " ");
       label["floor"] = "\"frozen GEMMs (floor)\""; label["lora"] = "\"LoRA step\""; label["full"] = "\"full fine-tuning\"";
       for (i = 1; i <= 3; i++) { m = modes[i];
         printf "%s %s %s %s %s\n", label[m], ms[m, "ours"] + 0, ms[m, "pytorch"] + 0, mib[m, "ours"] + 0, mib[m, "pytorch"] + 0 } }' \
  "$DAT" >"$TABLE"
title="$(sed -n 's/^# shape \(.*\) rounds.*/\1/p' "$DAT"), $(sed -n 's/^# cores=\(.*\)/cores=\1/p' "$DAT")"
cpu="$(sed -n 's/^# cpu=//p' "$DAT")"
date="$(sed -n 's/^# date=//p' "$DAT")"

gnuplot <<EOF
set terminal pngcairo size 1200,480 font "DejaVu Sans,11"
set output "$PNG"
set multiplot layout 1,2 title "lora (C++) vs PyTorch 1.13 (PEFT's formula): $title\n$cpu, $date"
set style data histograms
set style histogram clustered gap 1
set style fill solid 0.85 border -1
set boxwidth 0.9
set grid ytics
set key top left Left reverse
set yrange [0:*]
set offsets 0, 0, graph 0.12, 0

set title "median time per training step"
set ylabel "ms"
plot "$TABLE" using 2:xtic(1) title "lora (C++)" linecolor rgb "#1f77b4", \
     "" using 3 title "PyTorch" linecolor rgb "#ff7f0e", \
     "" using (\$0 - 1.0/6):2:(sprintf("%.0f", \$2)) with labels offset 0,0.7 notitle, \
     "" using (\$0 + 1.0/6):3:(sprintf("%.0f", \$3)) with labels offset 0,0.7 notitle

set title "peak resident memory of a 10-step training process"
set ylabel "MiB"
plot "< tail -n 2 $TABLE" using 4:xtic(1) title "lora (C++)" linecolor rgb "#1f77b4", \
     "" using 5 title "PyTorch (its peak includes the torch runtime)" linecolor rgb "#ff7f0e", \
     "" using (\$0 - 1.0/6):4:(sprintf("%.0f", \$4)) with labels offset 0,0.7 notitle, \
     "" using (\$0 + 1.0/6):5:(sprintf("%.0f", \$5)) with labels offset 0,0.7 notitle
unset multiplot
EOF
echo "wrote $PNG"
