# Chapter 13: bytes one sequence holds against context, MiniMax-M1's fixed lightning states beside the growing
# KV cache of its softmax layers, and the caches of an all-GQA model, DeepSeek-V3's MLA and MiniMax-M2.
# Data: 13_minimax_lightning_attention/cache_bytes.dat, "context m1_total m1_states m1_kv llama70b deepseek_v3 m2".
load 'style.gp'

data = datadir.'/13_minimax_lightning_attention/cache_bytes.dat'
set title "Cache bytes per sequence against context (bf16)"
set xlabel 'context (tokens)'
set ylabel 'bytes per sequence'
set logscale xy 2
set xrange [1024 : 4194304]
set xtics ('1K' 1024, '4K' 4096, '16K' 16384, '64K' 65536, '256K' 262144, '1M' 1048576, '4M' 4194304)
set yrange [2**24 : 2**46]
set ytics ('16 MiB' 2**24, '64 MiB' 2**26, '256 MiB' 2**28, '1 GiB' 2**30, '4 GiB' 2**32, '16 GiB' 2**34, \
           '64 GiB' 2**36, '256 GiB' 2**38, '1 TiB' 2**40)
set key top left font ',10'
plot data using 1 : 5 with linespoints linetype 2 title 'Llama-3.1-70B (GQA, 80 softmax layers)', \
     data using 1 : 7 with linespoints linetype 4 title 'MiniMax-M2 (GQA, 62 softmax layers)', \
     data using 1 : 6 with linespoints linetype 5 title 'DeepSeek-V3 (MLA, 61 layers)', \
     data using 1 : 2 with linespoints linetype 1 title 'MiniMax-M1: states + KV of 10 softmax layers', \
     data using 1 : 3 with lines linetype 3 dashtype 2 title 'MiniMax-M1: the 70 lightning states alone'
