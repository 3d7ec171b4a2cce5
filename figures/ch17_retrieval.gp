# Chapter 17: the pass key found (exact match of its five digits) against its depth in the filler, one panel
# per context length, one line per cache policy (the 95% Wilson intervals, wide for so few trials, are in the
# chapter's table rather than drawn). Data: the committed
# full sweep, chapters/17_what_cache_tricks_cost/results/retrieval.csv (method,label,length,depth,trials,
# correct,low,high), read from figures/. The methods' points are spread a little along x so that equal
# accuracies stay visible.
load 'style.gp'
if (!exists("dir")) dir = '../chapters/17_what_cache_tricks_cost/results'
data = dir.'/retrieval.csv'

lengths = system("awk -F'\"' 'NR > 1 {split($5, f, \",\"); print f[2]}' '".data."' | sort -nu | tr '\\n' ' '")
methods = "f32 int4 int2 window sinks_4 top_k quest_pages_of_16 h2o"
titles = "f32 int4 int2 window sinks+window top-k Quest H2O"
names = "f32|int4|int2|window|sinks 4|top-k|Quest pages of 16|H2O"
name(i) = system(sprintf("echo '%s' | cut -d'|' -f%d", names, i))
# One method's rows at one length, "depth share": the CSV split on its quotes puts the method in field 2 and
# ",length,depth,trials,correct,low,high" in field 5.
rows(method, length) = sprintf("< awk -F'\"' -v m='%s' -v L=%d 'NR > 1 && $2 == m {split($5, f, \",\"); if (f[2] == L) print f[3], f[5] / f[4]}' '%s'", method, length, data)
# Two more line types than the house palette has: black and grey.
set linetype 7 linecolor rgb '#000000' linewidth 2.2 pointtype 4 pointsize 0.8
set linetype 8 linecolor rgb '#999999' linewidth 2.2 pointtype 6 pointsize 0.8
set terminal svg enhanced size 720, 430 font 'sans-serif,13' background rgb 'white'
set output outfile
set multiplot layout 1, words(lengths) title 'Pass key found against its depth (SmolLM2-135M)' font 'sans-serif,15'
set xrange [0 : 100]
set yrange [-0.05 : 1.05]
set xtics 10, 40, 90
set xlabel 'depth of the key (%)'
do for [L = 1 : words(lengths)] {
  length = word(lengths, L) + 0
  set title sprintf('%d tokens', length) font 'sans-serif,13'
  set bmargin 8
  if (L == 1) { set ylabel 'found (share of trials)'; set key at screen 0.5, screen 0.0 center bottom horizontal maxrows 2 width 1 font ',10' } else { unset ylabel; unset key }
  plot for [i = 1 : 8] rows(name(i), length) using (100 * $1 + 1.6 * (i - 4.5)) : 2 with linespoints linetype i \
       title word(titles, i)
}
unset multiplot
