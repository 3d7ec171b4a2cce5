# Chapter 04: KV-cache bytes per token of the whole model, bf16: Llama-3.1-8B's shape as MHA, GQA and MQA,
# and real GQA models. Data: 04_grouped_query_attention/cache_bytes.dat, lines "label bytes".
load 'style.gp'

data = datadir.'/04_grouped_query_attention/cache_bytes.dat'
set title "KV-cache bytes per token, all layers, bf16\nLlama-3.1-8B's shape as MHA, GQA and MQA (blue); real GQA models (green)"
set ylabel 'bytes per token'
set logscale y 2
set yrange [4096 : 8 * 2**20]
set format y '%.0s'
set ytics ('4 KiB' 4096, '16 KiB' 16384, '64 KiB' 65536, '256 KiB' 262144, '1 MiB' 2**20, '4 MiB' 4 * 2**20)
set style fill solid 0.85 noborder
set boxwidth 0.6
set xtics rotate by -20 left font ',11'
set grid noxtics
unset key
plot data using 0 : 2 : ($0 < 3 ? 1 : 3) : xtic(1) with boxes linecolor variable, \
     data using 0 : ($2 * 1.25) : (bytes($2)) with labels font ',11'
