# Chapter 05: attention-output error of each cache format, with the bytes it stores per token (scales
# counted), on random keys and on keys with outlier channels 64 times larger.
# Data: 05_kv_cache/quant_error.dat, "format bytes_per_token error_random error_m4 error_m16 error_m64"; the
# first row (f32, the reference, error 0) is left out.
load 'style.gp'

data = datadir.'/05_kv_cache/quant_error.dat'
set title 'Quantized KV caches: output error and bytes stored'
set ylabel 'relative error of the attention output'
set xlabel 'cache format (KV bytes per token, Llama-3.1-8B, scales counted)' offset 0, -1
set bmargin 5
set logscale y
set format y '10^{%L}'
set yrange [1e-3 : 0.3]
set xrange [-0.6 : 3.6]
set xtics scale 0 font ',11'
set grid noxtics
set key top left font ',11'
label(f, b) = sprintf("%s\n%s", f, bytes(b))
plot data every ::1 using ($0 - 0.12) : 3 : xticlabels(label(strcol(1), column(2))) with points linetype 1 pointsize 1.6 title 'random keys', \
     data every ::1 using ($0 + 0.12) : 6 with points linetype 2 pointsize 1.6 title 'keys with outlier channels (64x)'
