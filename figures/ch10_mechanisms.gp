# Chapters 08-10: four caches at one model size (Llama-3.1-8B, 32 layers, bf16, one sequence) against context:
# dense, a sliding window of 4096, 4 kept sinks beside that window, and the block pattern of chapter 10 (B = 64,
# 4 local, 1 global, stride 8). Left: bytes the cache holds; right: cached tokens one decode step reads per layer.
# Data: 10_block_sparse/mechanisms.dat, a header row of labels (the four caches, twice), then
# "context stored x4 read x4".
load 'style.gp'
set terminal svg enhanced size 980,440 font 'sans-serif,13' background rgb 'white'
set output outfile

data = datadir.'/10_block_sparse/mechanisms.dat'
# The sinks + window curve lies just above the window's: dashed, so both show.
set linetype 3 dashtype 2
set multiplot layout 1, 2 title 'Memory and reads against context, Llama-3.1-8B size (bf16)' font 'sans-serif,15'
set logscale xy 2
set format x ''
set format y ''
set xlabel 'context length (tokens)'
set xrange [2**8 : 2**17.2]
do for [p = 8:17] { set xtics add (tokens(2**p) 2**p) }
set key top left font ',10'

set title 'KV cache held (all layers)' font ',13'
set ylabel 'bytes stored'
set yrange [2**24 : 2**35]
do for [p = 24:35] { set ytics add (bytes(2**p) 2**p) }
plot for [i = 2:5] data using 1 : i with lines linetype (i - 1) \
     title columnhead(i)

set title 'entries read per decode step (per layer)' font ',13'
set ylabel 'cached tokens read'
unset ytics
set ytics nomirror out scale 0.6
set format y ''
set yrange [2**8 : 2**17.2]
do for [p = 8:17] { set ytics add (tokens(2**p) 2**p) }
plot for [i = 6:9] data using 1 : i with lines linetype (i - 5) \
     title columnhead(i)
unset multiplot
