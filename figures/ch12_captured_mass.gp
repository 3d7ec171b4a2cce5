# Chapter 12: the share of dense attention's mass over the compressed entries that the top-k entries capture,
# against k, for m = 4, 16, 64 and three inputs (random, a planted needle, a repeated motif), with an aligned
# indexer and the layer's random one. Data: 12_compressed_sparse_attention/captured_mass.dat,
# "input m k aligned random".
load 'style.gp'

data = datadir.'/12_compressed_sparse_attention/captured_mass.dat'
set terminal svg enhanced size 900, 420 font 'sans-serif,12' background rgb 'white'
set output outfile
set multiplot layout 1, 2 title 'Mass captured by the top-k compressed entries (context 1024)' font 'sans-serif,15'
set logscale x 2
set xlabel 'k (entries kept)'
set yrange [0:1.05]
set key bottom right font ',10'
sel(input, m, col) = (strcol(1) eq input && $2 == m) ? column(col) : NaN
set title 'aligned indexer' font 'sans-serif,13'
plot data using 3 : (sel('random', 4, 4)) with linespoints linetype 1 title 'random, m = 4', \
     data using 3 : (sel('random', 16, 4)) with linespoints linetype 1 dashtype 2 title 'random, m = 16', \
     data using 3 : (sel('needle', 4, 4)) with linespoints linetype 2 title 'needle, m = 4', \
     data using 3 : (sel('repeated', 4, 4)) with linespoints linetype 3 title 'repeated, m = 4', \
     data using 3 : (sel('repeated', 64, 4)) with linespoints linetype 3 dashtype 2 title 'repeated, m = 64'
set title 'the layer''s random indexer' font 'sans-serif,13'
plot data using 3 : (sel('random', 4, 5)) with linespoints linetype 1 title 'random, m = 4', \
     data using 3 : (sel('random', 16, 5)) with linespoints linetype 1 dashtype 2 title 'random, m = 16', \
     data using 3 : (sel('needle', 4, 5)) with linespoints linetype 2 title 'needle, m = 4', \
     data using 3 : (sel('repeated', 4, 5)) with linespoints linetype 3 title 'repeated, m = 4', \
     data using 3 : (sel('repeated', 64, 5)) with linespoints linetype 3 dashtype 2 title 'repeated, m = 64'
unset multiplot
