# Chapter 15: KV-cache bytes of one sequence against context (bf16, all layers) for Gemma 3n E2B and E4B, with and
# without cross-layer sharing, and the bytes one decode step of E4B reads (the same with or without sharing).
# Data: 15_cross_layer_kv/cache_bytes.dat, a header row of labels, then "context bytes bytes ...".
load 'style.gp'

data = datadir.'/15_cross_layer_kv/cache_bytes.dat'
set title 'Gemma 3n KV cache of one sequence against context (bf16)'
set xlabel 'context length (tokens)'
set ylabel 'bytes'
set logscale xy 2
set format x ''
set format y ''
do for [p = 6:17] { set xtics add (tokens(2**p) 2**p) }
do for [p = 22:30:2] { set ytics add (bytes(2**p) 2**p) }
set xrange [2**6 : 2**17.4]
set yrange [2**21 : 2**31.5]
set key top left font ',11'
plot data using 1 : 2 with linespoints linetype 1 dashtype 2 title columnhead(2), \
     data using 1 : 3 with linespoints linetype 1 title columnhead(3), \
     data using 1 : 4 with linespoints linetype 2 dashtype 2 title columnhead(4), \
     data using 1 : 5 with linespoints linetype 2 title columnhead(5), \
     data using 1 : 6 with lines linetype 3 dashtype 3 title columnhead(6)
