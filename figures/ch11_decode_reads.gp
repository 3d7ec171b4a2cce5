# Chapter 11: one decode step of a whole model (61 layers): cached entries read by attention, and cache bytes read,
# for DeepSeek-V3's dense MLA and DeepSeek-V3.2's DSA (indexer keys in FP8 + attention over 2048 latents).
# Data: 11_deepseek_sparse_attention/decode_reads.dat, "context dense_entries dsa_entries dense_bytes
# indexer_bytes attention_bytes dsa_bytes".
load 'style.gp'

data = datadir.'/11_deepseek_sparse_attention/decode_reads.dat'
set terminal svg enhanced size 900, 400 font 'sans-serif,12' background rgb 'white'
set output outfile
set multiplot layout 1, 2 title 'One decode step, 61 layers: dense MLA (V3) vs DSA (V3.2)' font 'sans-serif,15'
set logscale xy 2
set xlabel 'context (tokens)'
set xtics ('1K' 1024, '4K' 4096, '16K' 16384, '64K' 65536)
set key top left font ',11'
set title 'latents attended per layer' font 'sans-serif,13'
set format y '%.0f'
plot data using 1 : 2 with linespoints linetype 2 title 'dense MLA: every token', \
     data using 1 : 3 with linespoints linetype 1 title 'DSA: top 2048'
set title 'cache bytes read' font 'sans-serif,13'
set ytics ('16 MiB' 2**24, '64 MiB' 2**26, '256 MiB' 2**28, '1 GiB' 2**30, '4 GiB' 2**32)
plot data using 1 : 4 with linespoints linetype 2 title 'dense MLA', \
     data using 1 : 7 with linespoints linetype 1 title 'DSA total', \
     data using 1 : 5 with linespoints linetype 3 dashtype 2 title 'DSA: indexer keys', \
     data using 1 : 6 with linespoints linetype 4 dashtype 2 title 'DSA: attention'
unset multiplot
