# Chapter 11: cache bytes per token, whole model: Llama-3.1-70B (GQA), DeepSeek-V3 (MLA), DeepSeek-V3.2 (MLA latent
# + FP8 index key with its scale), and what Hugging Face's DeepseekV32 module caches (per-head K and V expanded, bf16
# index keys). Data: 11_deepseek_sparse_attention/cache_bytes.dat, "label bytes".
load 'style.gp'

data = datadir.'/11_deepseek_sparse_attention/cache_bytes.dat'
set title 'Cache bytes per token, whole model (bf16 unless stated)'
set ylabel 'bytes per token'
set logscale y 2
set yrange [32768 : 16 * 2**20]
set ytics ('32 KiB' 32768, '128 KiB' 131072, '512 KiB' 2**19, '2 MiB' 2**21, '8 MiB' 2**23)
set style fill solid 0.85 noborder
set boxwidth 0.6
set grid noxtics
set xtics font ',10'
unset key
plot data using 0 : 2 : ($0 == 2 ? 2 : 1) : xtic(1) with boxes linecolor variable, \
     data using 0 : ($2 * 1.3) : (bytes($2)) with labels font ',11'
