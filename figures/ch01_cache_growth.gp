# Chapter 01: how the KV cache grows with the context, for the chapter's one head and for a real model.
# Data: 01_attention_core/cache_growth.dat, columns "tokens one_head_fp32_bytes llama31_8b_bf16_bytes".
load 'style.gp'

data = datadir.'/01_attention_core/cache_growth.dat'

set title 'KV-cache size against context length'
set xlabel 'context length (tokens)'
set ylabel 'KV-cache size (bytes)'
set logscale xy 2
set key top left
set format x ''
set format y ''
# Label every other power of two on x, and every power of 32 on y (1 B, 32 B, 1 KiB, ... 32 GiB).
do for [p = 0:30:2] { set xtics add (tokens(2**p) 2**p) }
do for [p = 0:50:5] { set ytics add (bytes(2**p) 2**p) }
set mxtics default
set mytics default

# Name the size at the longest context next to the end of each line.
stats data using 1 : 2 nooutput
set label 1 bytes(STATS_max_y) at STATS_max_x, STATS_max_y right offset -0.8, 0.9 textcolor lt 1
stats data using 1 : 3 nooutput
set label 2 bytes(STATS_max_y) at STATS_max_x, STATS_max_y right offset -0.8, 0.9 textcolor lt 2

plot data using 1 : 3 with linespoints linetype 2 title 'Llama-3.1-8B, whole model, bf16', \
     data using 1 : 2 with linespoints linetype 1 title 'one head of this chapter, float32'
