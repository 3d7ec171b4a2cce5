# Chapter 12: bytes one layer's cache holds for one sequence against context (bf16): DeepSeek-V3's MLA, V3.2's DSA,
# V4-Flash's CSA, HCA and sliding layers (window, compressed entries, indexer keys, pending block).
# Data: 12_compressed_sparse_attention/cache_bytes.dat, "context mla dsa csa hca sliding".
load 'style.gp'

data = datadir.'/12_compressed_sparse_attention/cache_bytes.dat'
set title 'Cache of one layer, one sequence (bf16)'
set logscale xy 2
set xlabel 'context (tokens)'
set ylabel 'bytes held'
set xtics ('1K' 1024, '8K' 8192, '64K' 65536, '512K' 524288)
set ytics ('128 KiB' 2**17, '1 MiB' 2**20, '8 MiB' 2**23, '64 MiB' 2**26, '512 MiB' 2**29, '1 GiB' 2**30)
set key top left font ',11'
plot data using 1 : 2 with linespoints linetype 1 title 'MLA (V3): 1,152 B per token', \
     data using 1 : 3 with linespoints linetype 2 title 'DSA (V3.2): 1,284 B per token', \
     data using 1 : 4 with linespoints linetype 3 title 'CSA (V4): 128 KiB window + 320 B per token', \
     data using 1 : 5 with linespoints linetype 4 title 'HCA (V4): 128 KiB window + 8 B per token', \
     data using 1 : 6 with linespoints linetype 5 title 'sliding (V4): 128 KiB window'
