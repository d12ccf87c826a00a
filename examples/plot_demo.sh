#!/usr/bin/env bash
# Draws the loss curves of a domain_adaptation run as one PNG with gnuplot
# (Debian: gnuplot-nox):
#   left    pretraining of the base on the general corpus (train and validation loss)
#   middle  in-domain validation loss while adapting: each LoRA adapter, full fine-tuning
#   right   general-corpus validation loss of the same models (forgetting), and of
#           the base with the adapters detached
#
#   examples/plot_demo.sh [OUT_DIR] [PNG]
# OUT_DIR is the demo's --out directory (default build/examples/domain_adaptation_out);
# PNG defaults to OUT_DIR/demo_loss.png.
set -euo pipefail

out_dir=${1:-build/examples/domain_adaptation_out}
png=${2:-$out_dir/demo_loss.png}
finetune=$out_dir/finetune_loss.csv
pretrain=$out_dir/pretrain_loss.csv
command -v gnuplot >/dev/null || { echo "plot_demo.sh: gnuplot not found (apt-get install gnuplot-nox)" >&2; exit 1; }
[[ -f $finetune ]] || { echo "plot_demo.sh: $finetune not found; run domain_adaptation --out $out_dir first" >&2; exit 1; }

tmp=$(mktemp -d)
trap 'rm -rf "$tmp"' EXIT

# One whitespace-separated file per phase and column (step value), rows where
# that column was measured: gnuplot then needs no CSV or string handling.
split() {  # split CSV COLUMN SUFFIX
  awk -F, -v col="$2" -v dir="$tmp" -v suffix="$3" \
    'NR > 1 && $col != "" && $col != "nan" { print $2, $col > (dir "/" $1 "." suffix) }' "$1"
}
split "$finetune" 4 val
split "$finetune" 5 general
have_pretrain=0
if [[ -f $pretrain ]]; then
  split "$pretrain" 3 train
  split "$pretrain" 4 val
  have_pretrain=1
fi

phases=$(awk -F, 'NR > 1 && $1 != "base_alone" && !seen[$1]++ { print $1 }' "$finetune")
plot_val="" plot_general=""
lora_colors=("#6a3d9a" "#33a02c" "#1f78b4" "#ff7f00") lora_count=0
for phase in $phases; do
  if [[ $phase == full_* ]]; then
    title="full FT ${phase#full_}" general_title=$title style="lc rgb '#e31a1c' lw 2"
  else
    title="LoRA ${phase#lora_}" general_title="base + ${phase#lora_} adapter"
    style="lc rgb '${lora_colors[lora_count % 4]}'"
    lora_count=$((lora_count + 1))
  fi
  plot_val+="'$tmp/$phase.val' using 1:2 with linespoints $style title '$title', "
  plot_general+="'$tmp/$phase.general' using 1:2 with linespoints $style title '$general_title', "
done
plot_general+="'$tmp/base_alone.general' using 1:2 with lines dashtype 2 linewidth 2 lc rgb 'black' title 'base, adapters detached'"

{
  echo "set terminal pngcairo size 1500,460 font 'DejaVu Sans,10'"
  echo "set output '$png'"
  echo "set grid; set key top right; set xlabel 'step'; set ylabel 'loss (nats / character)'"
  echo "set multiplot layout 1,3"
  if [[ $have_pretrain == 1 ]]; then
    echo "set title 'Pretraining the base (general prose)'"
    echo "plot '$tmp/pretrain.train' using 1:2 with lines lc rgb '#9ecae1' title 'train (per step)', \
               '$tmp/pretrain.val' using 1:2 with linespoints lc rgb '#08519c' lw 2 title 'validation'"
  else
    echo "set title 'Pretraining: no pretrain_loss.csv (base came from the cache)'"
    echo "unset key; plot [0:1] [0:1] 1/0 notitle; set key"
  fi
  echo "set title 'Adaptation: in-domain validation loss'"
  echo "set logscale y"
  echo "plot ${plot_val%, }"
  echo "unset logscale y"
  echo "set title 'Forgetting: general-prose validation loss'"
  echo "set key right center"
  echo "plot $plot_general"
  echo "unset multiplot"
} > "$tmp/plot.gp"
gnuplot "$tmp/plot.gp"
echo "plot_demo.sh: wrote $png"
