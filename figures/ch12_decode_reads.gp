# Chapter 12: what one decode query of one layer reads against context: DeepSeek-V3's MLA, V3.2's DSA (index keys
# and top-2048 latents), V4-Flash's CSA (window, top-512 entries, every indexer key), HCA (window and every entry)
# and the sliding layer. Data: 12_compressed_sparse_attention/decode_reads.dat,
# "context mla_entries mla_bytes dsa_entries dsa_bytes csa_entries csa_bytes hca_entries hca_bytes win_entries win_bytes".
load 'style.gp'

data = datadir.'/12_compressed_sparse_attention/decode_reads.dat'
set terminal svg enhanced size 900, 420 font 'sans-serif,12' background rgb 'white'
set output outfile
set multiplot layout 1, 2 title 'One decode query, one layer, bf16' font 'sans-serif,15'
set logscale xy 2
set xlabel 'context (tokens)'
set xtics ('1K' 1024, '8K' 8192, '64K' 65536, '512K' 524288) 
set key top left font ',10'
set title 'cached entries read' font 'sans-serif,13'
set format y '2^{%L}'
plot data using 1 : 2 with linespoints linetype 1 title 'MLA (V3)', \
     data using 1 : 4 with linespoints linetype 2 title 'DSA (V3.2)', \
     data using 1 : 6 with linespoints linetype 3 title 'CSA (V4)', \
     data using 1 : 8 with linespoints linetype 4 title 'HCA (V4)', \
     data using 1 : 10 with linespoints linetype 5 title 'sliding (V4)'
set title 'bytes read' font 'sans-serif,13'
set format y '%h'
set ytics ('128 KiB' 2**17, '1 MiB' 2**20, '8 MiB' 2**23, '64 MiB' 2**26, '512 MiB' 2**29, '1 GiB' 2**30)
plot data using 1 : 3 with linespoints linetype 1 title 'MLA (V3)', \
     data using 1 : 5 with linespoints linetype 2 title 'DSA (V3.2)', \
     data using 1 : 7 with linespoints linetype 3 title 'CSA (V4)', \
     data using 1 : 9 with linespoints linetype 4 title 'HCA (V4)', \
     data using 1 : 11 with linespoints linetype 5 title 'sliding (V4)'
unset multiplot
