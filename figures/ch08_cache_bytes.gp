# Chapter 08: KV-cache bytes of one sequence (= the bytes one decode step reads) against context, bf16, all
# layers: Mistral-7B with and without its window, Gemma 3 27B all-global against its 52 local + 10 global
# layers, and gpt-oss-120b.
# Data: 08_sliding_window/cache_bytes.dat, a header row of labels, then "context bytes bytes ...".
load 'style.gp'

data = datadir.'/08_sliding_window/cache_bytes.dat'
set title 'KV cache of one sequence against context (bf16, all layers)'
set xlabel 'context length (tokens)'
set ylabel 'bytes stored = bytes read per step'
set logscale xy 2
set format x ''
set format y ''
do for [p = 6:17] { set xtics add (tokens(2**p) 2**p) }
do for [p = 22:36:2] { set ytics add (bytes(2**p) 2**p) }
set xrange [2**6 : 2**17.4]
set yrange [2**22 : 2**37]
set key top left font ',11'
plot for [i = 2:6] data using 1 : i with linespoints linetype (i - 1) title columnhead(i)
