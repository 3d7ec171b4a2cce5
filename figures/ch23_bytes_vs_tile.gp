# Chapter 23: bytes moved between slow and fast memory by one Llama-3.1-8B layer's prefill of 4096 tokens,
# against the tile size B (B_r = B_c = B), for the standard algorithm (flat: it does not tile) and the tiled one.
# The dashed lines mark the largest square tile whose working set fits an A100's and an H100's shared memory.
# Data: 23_tiling_attention/io_tiles.dat (first line "# ... h100_square = N, a100_square = M"), columns
# B "working set" tiled standard.
load 'style.gp'

data = datadir.'/23_tiling_attention/io_tiles.dat'
h100 = system("sed -n 's/.*h100_square = \\([0-9]*\\).*/\\1/p' '".data."'") + 0
a100 = system("sed -n 's/.*a100_square = \\([0-9]*\\).*/\\1/p' '".data."'") + 0
set title 'Attention traffic against the tile size (Llama-3.1-8B layer, T = 4096, bf16)'
set xlabel 'tile size B = B_r = B_c (rows)'
set ylabel 'bytes moved, slow <-> fast memory'
set logscale xy 2
set xtics (1, 4, 16, 64, 256, 1024, 4096)
set ytics ('512 MiB' 2**29, '1 GiB' 2**30, '2 GiB' 2**31, '4 GiB' 2**32, '8 GiB' 2**33, '16 GiB' 2**34, \
           '32 GiB' 2**35, '64 GiB' 2**36, '128 GiB' 2**37)
set key top right font ',11'
set arrow from a100, graph 0 to a100, graph 1 nohead dashtype 3 linecolor rgb '#4d4d4d'
set arrow from h100, graph 0 to h100, graph 1 nohead dashtype 2 linecolor rgb '#4d4d4d'
set label sprintf('A100: %d', a100) at a100, graph 0.93 right offset -0.5, 0 font ',10' textcolor rgb '#4d4d4d'
set label sprintf('H100: %d', h100) at h100, graph 0.85 left offset 0.5, 0 font ',10' textcolor rgb '#4d4d4d'
plot data using 1 : 4 with lines linetype 2 title 'standard (S and P through slow memory)', \
     data using 1 : 3 with linespoints linetype 1 title 'tiled (causal, tiles above the diagonal skipped)'
