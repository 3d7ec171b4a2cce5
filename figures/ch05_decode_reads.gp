# Chapter 05: KV-cache bytes one decode step of one sequence reads against context, every preset, bf16.
# Data: 05_kv_cache/decode_reads.dat, a header row of model names, then "context bytes bytes ...".
load 'style.gp'

data = datadir.'/05_kv_cache/decode_reads.dat'
set title 'KV-cache bytes read per decode step (one sequence, bf16, all layers)'
set xlabel 'context length (tokens)'
set ylabel 'bytes read per step'
set logscale xy 2
set format x ''
set format y ''
do for [p = 8:20:2] { set xtics add (tokens(2**p) 2**p) }
do for [p = 24:40:2] { set ytics add (bytes(2**p) 2**p) }
set yrange [2**24 : 2**40]
set key top left font ',11'
plot for [i = 2:9] data using 1 : i with linespoints linetype (i - 1) title columnhead(i)
