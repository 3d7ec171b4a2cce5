# Chapter 05: the largest batch that fits 80 GB beside 16 GB of bf16 weights, for four attention shapes of
# Llama-3.1-8B's size (32 layers, 32 query heads of 128): MHA, GQA with 8 KV heads, MQA, and MLA with a
# latent of 512 + 64.
# Data: 05_kv_cache/batch_fit.dat, "context mha gqa8 mqa mla".
load 'style.gp'

data = datadir.'/05_kv_cache/batch_fit.dat'
set title "Sequences that fit beside the weights (80 GB, 8e9 bf16 parameters, 32 layers)"
set xlabel 'sequence length (tokens)'
set ylabel 'largest batch'
set logscale xy 2
set format x ''
do for [p = 10:20:2] { set xtics add (tokens(2**p) 2**p) }
set ytics ('1' 1, '4' 4, '16' 16, '64' 64, '256' 256, '1K' 1024, '4K' 4096)
set yrange [0.8 : 8192]
set key top right
# A batch of 0 (nothing fits) is left out of the log axis.
fit_or_nan(c) = column(c) > 0 ? column(c) : NaN
plot data using 1 : (fit_or_nan(2)) with linespoints linetype 2 title 'MHA (32 KV heads)', \
     data using 1 : (fit_or_nan(3)) with linespoints linetype 1 title 'GQA (8 KV heads)', \
     data using 1 : (fit_or_nan(4)) with linespoints linetype 3 title 'MQA (1 KV head)', \
     data using 1 : (fit_or_nan(5)) with linespoints linetype 4 title 'MLA (latent 512 + 64)'
