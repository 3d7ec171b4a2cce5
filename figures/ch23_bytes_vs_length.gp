# Chapter 23: bytes moved by one Llama-3.1-8B layer's causal prefill against the prompt length, for the standard
# algorithm, the tiled one (square tiles, the largest that fit the fast memory) and the floor (Q, K, V read and O
# written once each).
# Data: 23_tiling_attention/io_lengths.dat (first line "# ... tiles B x B"), columns T standard tiled
# "Q+K+V+O once".
load 'style.gp'

data = datadir.'/23_tiling_attention/io_lengths.dat'
tile = system("sed -n 's/.*tiles \\([0-9]*\\) x.*/\\1/p' '".data."'") + 0
set title sprintf('Attention traffic against the prompt length (tiles %d x %d, bf16)', tile, tile)
set xlabel 'prompt length T (tokens)'
set ylabel 'bytes moved, slow <-> fast memory'
set logscale xy 2
set format x '%.0f'
set xtics ('256' 256, '1K' 1024, '4K' 4096, '16K' 16384, '64K' 65536, '128K' 131072)
set ytics ('1 MiB' 2**20, '16 MiB' 2**24, '256 MiB' 2**28, '4 GiB' 2**32, '64 GiB' 2**36, '1 TiB' 2**40, \
           '16 TiB' 2**44)
set key top left font ',11'
plot data using 1 : 2 with linespoints linetype 2 title 'standard', \
     data using 1 : 3 with linespoints linetype 1 title 'tiled', \
     data using 1 : 4 with lines linetype 3 dashtype 2 title 'floor: Q, K, V, O once'
