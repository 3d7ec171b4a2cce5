# Chapter 07: one decode token of one DeepSeek-V3 layer: arithmetic of the naive and absorbed paths, and cache
# bytes read by the latent cache and by a cache of per-head keys and values, against context.
# Data: 07_multi_head_latent_attention/decode_cost.dat, "context naive_flops absorbed_flops latent_bytes kv_bytes".
load 'style.gp'

data = datadir.'/07_multi_head_latent_attention/decode_cost.dat'
set terminal svg enhanced size 900, 400 font 'sans-serif,12' background rgb 'white'
set output outfile
set multiplot layout 1, 2 title 'MLA decode, one token, one DeepSeek-V3 layer' font 'sans-serif,15'
set logscale xy 10
set format y '10^{%L}'
set xlabel 'context (tokens)'
set xtics ('1K' 1024, '4K' 4096, '16K' 16384, '64K' 65536)
set key top left font ',11'
set title 'arithmetic (FLOPs)' font 'sans-serif,13'
plot data using 1 : 2 with linespoints linetype 2 title 'naive: rebuild K, V', \
     data using 1 : 3 with linespoints linetype 1 title 'absorbed'
set title 'cache bytes read (bf16)' font 'sans-serif,13'
plot data using 1 : 5 with linespoints linetype 2 title 'per-head K and V cached', \
     data using 1 : 4 with linespoints linetype 1 title 'latent + RoPE key cached'
unset multiplot
