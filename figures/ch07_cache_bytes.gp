# Chapter 07: KV-cache bytes per token at DeepSeek-V3's width (61 layers, 128 heads, bf16) for MHA, GQA with
# 8 KV heads, MQA and MLA. Data: 07_multi_head_latent_attention/cache_bytes.dat, "label bytes".
load 'style.gp'

data = datadir.'/07_multi_head_latent_attention/cache_bytes.dat'
set title "KV-cache bytes per token at DeepSeek-V3's width (61 layers, bf16)"
set ylabel 'bytes per token'
set logscale y 2
set yrange [16384 : 16 * 2**20]
set ytics ('16 KiB' 16384, '64 KiB' 65536, '256 KiB' 262144, '1 MiB' 2**20, '4 MiB' 4 * 2**20, '16 MiB' 16 * 2**20)
set style fill solid 0.85 noborder
set boxwidth 0.6
set grid noxtics
unset key
plot data using 0 : 2 : ($0 == 3 ? 2 : 1) : xtic(1) with boxes linecolor variable, \
     data using 0 : ($2 * 1.3) : (bytes($2)) with labels font ',11'
