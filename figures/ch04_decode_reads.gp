# Chapter 04: bytes one decode step reads from the KV cache against context length, Llama-3.1-8B's shape
# (32 layers, 32 query heads of 128, bf16) with G = 32 (MHA), 8 (its GQA) and 1 (MQA).
# Data: 04_grouped_query_attention/decode_reads.dat, "context mha gqa mqa".
load 'style.gp'

data = datadir.'/04_grouped_query_attention/decode_reads.dat'
set title 'KV-cache bytes read per decode step (Llama-3.1-8B shape, bf16)'
set xlabel 'context length (tokens)'
set ylabel 'bytes read per step'
set logscale xy 2
set xtics 1024, 4
set format x '%.0f'
set xtics add ('1K' 1024, '4K' 4096, '16K' 16384, '64K' 65536)
set yrange [2**24 : 2**37]
set ytics ('16 MiB' 2**24, '64 MiB' 2**26, '256 MiB' 2**28, '1 GiB' 2**30, '4 GiB' 2**32, '16 GiB' 2**34, '64 GiB' 2**36)
set key top left
plot data using 1 : 2 with linespoints linetype 2 title 'MHA (G = 32)', \
     data using 1 : 3 with linespoints linetype 1 title 'GQA (G = 8)', \
     data using 1 : 4 with linespoints linetype 3 title 'MQA (G = 1)'
